//! Host memory and memfds for the crate's unit tests.

use std::os::fd::{FromRawFd, OwnedFd};

/// Page-aligned host memory for mappings; only ever touched through its raw pointer while
/// mapped.
pub(crate) struct HostMem {
    _storage: Vec<u8>,
    base: *mut u8,
}

impl HostMem {
    pub(crate) fn new(len: usize) -> Self {
        let mut storage = vec![0u8; len + 4096];
        let p = storage.as_mut_ptr();
        let base = p.wrapping_add(p.align_offset(4096));
        Self {
            _storage: storage,
            base,
        }
    }

    pub(crate) fn at(&self, offset: u64) -> *mut u8 {
        self.base.wrapping_add(offset as usize)
    }
}

/// A memfd of `len` bytes.
pub(crate) fn memfd(len: u64) -> OwnedFd {
    // SAFETY: the name is a NUL-terminated string; the result is checked.
    let fd = unsafe { libc::memfd_create(c"emulated-test".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is a new descriptor nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    std::fs::File::from(fd.try_clone().unwrap())
        .set_len(len)
        .unwrap();
    fd
}
