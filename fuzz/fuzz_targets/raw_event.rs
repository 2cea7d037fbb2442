//! Router input through the EVENT pass-through, and every payload it accepts
//! forwarded as a CALL in both serializers (`subtocall_fuzz::raw_event`).

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|frame: &[u8]| subtocall_fuzz::raw_event(frame));
