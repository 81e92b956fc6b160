#![no_main]
//! See breakwater::fuzzing::headers for the promises checked.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(broken) = breakwater::fuzzing::headers(data) {
        panic!("headers: {broken}");
    }
});
