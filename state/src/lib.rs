//! The files a Warden process keeps on its host, for the agent and the
//! coordinator alike: the configuration file (read, parsed, and its one
//! error type), directories only their owner may enter, files written whole
//! with mode 0600, the lock that keeps one process per state directory, and
//! unix sockets that replace only a stale socket. Nothing here follows a
//! symbolic link where one could have been planted.

pub mod config;
pub mod dir;
pub mod file;
pub mod lock;
pub mod socket;

/// What kind of thing a path is, for messages ("a regular file", …).
pub fn kind_of(t: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if t.is_symlink() {
        "a symbolic link"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_file() {
        "a regular file"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else {
        "something that is not a file"
    }
}
