//! Router input through the full decoder of both serializers, and whatever
//! decodes encoded and decoded again (`subtocall_fuzz::codec`).

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|frame: &[u8]| subtocall_fuzz::codec(frame));
