#![no_main]
//! See breakwater::fuzzing::spool for the promises checked.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(broken) = breakwater::fuzzing::spool(data) {
        panic!("spool: {broken}");
    }
});
