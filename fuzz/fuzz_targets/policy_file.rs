//! A policy file as an operator writes it, parsed into rules or problems
//! (`subtocall_fuzz::policy_file`).

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &[u8]| subtocall_fuzz::policy_file(text));
