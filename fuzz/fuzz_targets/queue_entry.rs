//! A queue entry's stored event as Redis gives it back (written by any
//! instance, build or tool), decoded and stored again
//! (`subtocall_fuzz::queue_entry`).

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|stored: &[u8]| subtocall_fuzz::queue_entry(stored));
