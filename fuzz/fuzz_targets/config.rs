#![no_main]
//! See breakwater::fuzzing::config for the promises checked.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(broken) = breakwater::fuzzing::config(data) {
        panic!("config: {broken}");
    }
});
