#![no_main]
//! See breakwater::fuzzing::audit_log for the promises checked.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(broken) = breakwater::fuzzing::audit_log(data) {
        panic!("audit_line: {broken}");
    }
});
