//! End-to-end tests: our binaries against peers nobody here wrote
//! (libnbd's nbdinfo/nbdsh, qemu-img, fio, upstream nbdkit).

mod common;

mod copy_captive_qcow2;
mod copy_common;
mod copy_errors;
mod copy_file_to_nbd;
mod copy_lanes;
mod copy_nbd_to_file;
mod copy_nbd_to_nbd;
mod copy_nbd_to_null;
mod copy_pipe;
mod copy_progress;
mod copy_sparse;
mod curl;
mod filter_blocksize;
mod filter_cache;
mod filter_cow;
mod filter_delay;
mod filter_error;
mod filter_exitlast;
mod filter_exitwhen;
mod filter_fua;
mod filter_ip;
mod filter_limit;
mod filter_log;
mod filter_noextents;
mod filter_nozero;
mod filter_offset;
mod filter_partition;
mod filter_rate;
mod filter_readahead;
mod filter_retry;
mod filter_stats;
mod filter_truncate;
mod nbddump;
mod nbdinfo;
mod nbdkit_cli;
mod nginx;
mod server_bad_input;
mod server_captive;
mod server_commands;
mod server_fio;
mod server_info;
mod server_qemu;
mod xz;
