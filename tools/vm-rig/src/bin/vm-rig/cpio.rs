//! A writer for the cpio "newc" format, the one the kernel unpacks as an initramfs.
//!
//! Written here rather than piped through `cpio` so the archive's contents and names are exactly
//! what the rig decided, in any order, with no dependency on the host's cpio or find. The archive
//! is left uncompressed: under TCG the guest would spend longer inflating it than QEMU spends
//! loading the raw bytes.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::Path;

const MODE_DIR: u32 = 0o040_000;
const MODE_FILE: u32 = 0o100_000;
const MODE_SYMLINK: u32 = 0o120_000;

/// An initramfs being written.
pub struct Archive {
    out: BufWriter<File>,
    written: u64,
    next_ino: u32,
}

impl Archive {
    /// Creates the archive file at `path`.
    pub fn create(path: &Path) -> io::Result<Self> {
        Ok(Self {
            out: BufWriter::new(File::create(path)?),
            written: 0,
            next_ino: 1,
        })
    }

    /// Adds a directory (`name` without a leading slash, e.g. `bin`).
    pub fn dir(&mut self, name: &str) -> io::Result<()> {
        self.entry(name, MODE_DIR | 0o755, &[])
    }

    /// Adds a regular file with `mode`'s permission bits.
    pub fn file(&mut self, name: &str, mode: u32, data: &[u8]) -> io::Result<()> {
        self.entry(name, MODE_FILE | (mode & 0o7777), data)
    }

    /// Adds a symbolic link `name` pointing at `target`.
    pub fn symlink(&mut self, name: &str, target: &str) -> io::Result<()> {
        self.entry(name, MODE_SYMLINK | 0o777, target.as_bytes())
    }

    /// Writes the trailer and flushes; returns the archive's size in bytes.
    pub fn finish(mut self) -> io::Result<u64> {
        let header = header("TRAILER!!!", 0, 0, 0);
        self.put(&header)?;
        self.out.flush()?;
        Ok(self.written)
    }

    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) -> io::Result<()> {
        let size = u32::try_from(data.len()).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{name}: larger than 4 GiB"),
            )
        })?;
        let ino = self.next_ino;
        self.next_ino += 1;
        let header = header(name, ino, mode, size);
        self.put(&header)?;
        self.put(data)?;
        self.pad()
    }

    fn put(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let fill = padding(self.written);
        self.put(&[0; 3][..fill])
    }
}

/// Zero bytes that bring `offset` to the next multiple of four (newc aligns headers and data).
fn padding(offset: u64) -> usize {
    ((4 - offset % 4) % 4) as usize
}

/// One newc header: magic, thirteen 8-digit hex fields, the NUL-terminated name, padding to 4.
fn header(name: &str, ino: u32, mode: u32, file_size: u32) -> Vec<u8> {
    let nlink = if mode & MODE_DIR == MODE_DIR { 2 } else { 1 };
    let name_size = name.len() + 1;
    let fields = [
        ino,
        mode,
        0,
        0,
        nlink,
        0,
        file_size,
        0,
        0,
        0,
        0,
        name_size as u32,
        0,
    ];
    let mut out = b"070701".to_vec();
    for field in fields {
        out.extend_from_slice(format!("{field:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    out.resize(out.len() + padding(out.len() as u64), 0);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads back (name, mode, data) triples the way the kernel's unpacker walks the archive.
    fn entries(bytes: &[u8]) -> Vec<(String, u32, Vec<u8>)> {
        let mut at = 0;
        let mut out = Vec::new();
        loop {
            assert_eq!(&bytes[at..at + 6], b"070701", "magic at offset {at}");
            let field = |i: usize| {
                let text = std::str::from_utf8(&bytes[at + 6 + 8 * i..at + 14 + 8 * i]).unwrap();
                u32::from_str_radix(text, 16).unwrap() as usize
            };
            let (mode, size, name_size) = (field(1), field(6), field(11));
            let name_at = at + 110;
            let name = std::str::from_utf8(&bytes[name_at..name_at + name_size - 1]).unwrap();
            assert_eq!(bytes[name_at + name_size - 1], 0, "name is NUL-terminated");
            let data_at = (name_at + name_size).next_multiple_of(4);
            if name == "TRAILER!!!" {
                return out;
            }
            out.push((
                name.to_string(),
                mode as u32,
                bytes[data_at..data_at + size].to_vec(),
            ));
            at = (data_at + size).next_multiple_of(4);
        }
    }

    #[test]
    fn archive_reads_back_with_newc_alignment() {
        let dir = std::env::temp_dir().join(format!("vm-rig-cpio-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a.cpio");
        let mut archive = Archive::create(&path).unwrap();
        archive.dir("bin").unwrap();
        archive.file("bin/x", 0o755, b"hello").unwrap();
        archive.symlink("bin/sh", "busybox").unwrap();
        archive.file("init", 0o644, b"").unwrap();
        let size = archive.finish().unwrap();
        let bytes = std::fs::read(&path).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();

        assert_eq!(size, bytes.len() as u64);
        assert_eq!(bytes.len() % 4, 0);
        assert_eq!(
            entries(&bytes),
            vec![
                ("bin".to_string(), 0o040_755, vec![]),
                ("bin/x".to_string(), 0o100_755, b"hello".to_vec()),
                ("bin/sh".to_string(), 0o120_777, b"busybox".to_vec()),
                ("init".to_string(), 0o100_644, vec![]),
            ]
        );
    }

    #[test]
    fn header_fields_are_eight_hex_digits() {
        let h = header("ab", 0x12, MODE_FILE | 0o644, 0x1234_5678);
        assert_eq!(&h[..6], b"070701");
        assert_eq!(&h[6..14], b"00000012");
        assert_eq!(&h[14..22], b"000081a4");
        assert_eq!(&h[54..62], b"12345678");
        assert_eq!(&h[94..102], b"00000003", "name size counts the NUL");
        assert_eq!(&h[110..113], b"ab\0");
        assert_eq!(h.len(), 116, "110 + 3 name bytes, padded to 4");
    }
}
