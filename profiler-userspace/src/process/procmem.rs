//! Reading the memory of another process.
//!
//! `process_vm_readv` costs one system call per read and needs no open file;
//! where it is not allowed (some seccomp profiles return EPERM) or not built
//! in (ENOSYS), reads go through `/proc/PID/mem` instead.

use std::{cell::OnceCell, fs::File, io, os::unix::fs::FileExt};

/// The address space of one process. Reads fail, without panicking, when the
/// process has exited or the address is not mapped.
pub struct ProcessMemory {
    pid: u32,
    /// `/proc/PID/mem`, opened once `process_vm_readv` turned out unusable.
    mem_file: OnceCell<File>,
}

impl ProcessMemory {
    pub fn new(pid: u32) -> Self {
        ProcessMemory { pid, mem_file: OnceCell::new() }
    }

    /// Fills `buf` with the bytes at `addr`; a short read is an error.
    pub fn read(&self, addr: u64, buf: &mut [u8]) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let result = match self.mem_file.get() {
            Some(_) => self.read_mem_file(addr, buf),
            None => match self.read_vm(addr, buf) {
                Err(e) if matches!(e.raw_os_error(), Some(libc::EPERM | libc::ENOSYS)) => self.read_mem_file(addr, buf),
                other => other,
            },
        };
        result.map_err(|e| {
            io::Error::new(e.kind(), format!("reading {} bytes at {addr:#x} of process {}: {e}", buf.len(), self.pid))
        })
    }

    pub fn read_vec(&self, addr: u64, len: usize) -> io::Result<Vec<u8>> {
        let mut buf = vec![0; len];
        self.read(addr, &mut buf)?;
        Ok(buf)
    }

    pub fn read_u64(&self, addr: u64) -> io::Result<u64> {
        let mut buf = [0; 8];
        self.read(addr, &mut buf)?;
        Ok(u64::from_ne_bytes(buf))
    }

    pub fn read_i64(&self, addr: u64) -> io::Result<i64> {
        let mut buf = [0; 8];
        self.read(addr, &mut buf)?;
        Ok(i64::from_ne_bytes(buf))
    }

    pub fn read_u32(&self, addr: u64) -> io::Result<u32> {
        let mut buf = [0; 4];
        self.read(addr, &mut buf)?;
        Ok(u32::from_ne_bytes(buf))
    }

    fn read_vm(&self, addr: u64, buf: &mut [u8]) -> io::Result<()> {
        let local = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
        let remote = libc::iovec { iov_base: addr as *mut libc::c_void, iov_len: buf.len() };
        // SAFETY: `local` covers exactly `buf`, which we borrow mutably; the
        // kernel checks `remote` against the other process's mappings.
        let n = unsafe { libc::process_vm_readv(self.pid as libc::pid_t, &local, 1, &remote, 1, 0) };
        match n {
            -1 => Err(io::Error::last_os_error()),
            // Partial: the range runs into an unmapped page.
            n if (n as usize) < buf.len() => Err(io::Error::from_raw_os_error(libc::EFAULT)),
            _ => Ok(()),
        }
    }

    fn read_mem_file(&self, addr: u64, buf: &mut [u8]) -> io::Result<()> {
        let file = match self.mem_file.get() {
            Some(file) => file,
            None => {
                let file = File::open(format!("/proc/{}/mem", self.pid))?;
                self.mem_file.get_or_init(|| file)
            }
        };
        file.read_exact_at(buf, addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_memory() {
        let value: u64 = 0x0123_4567_89ab_cdef;
        let text = *b"hello, memory";
        let mem = ProcessMemory::new(std::process::id());
        assert_eq!(mem.read_u64(&value as *const u64 as u64).unwrap(), value);
        assert_eq!(mem.read_vec(text.as_ptr() as u64, text.len()).unwrap(), text);
    }

    #[test]
    fn mem_file_fallback_reads_the_same() {
        let value: u32 = 0xfeed_f00d;
        let mem = ProcessMemory::new(std::process::id());
        let mut buf = [0; 4];
        mem.read_mem_file(&value as *const u32 as u64, &mut buf).unwrap();
        assert_eq!(u32::from_ne_bytes(buf), value);
        // Once opened, the file serves every read.
        assert_eq!(mem.read_u32(&value as *const u32 as u64).unwrap(), value);
    }

    #[test]
    fn unmapped_address_is_an_error() {
        let mem = ProcessMemory::new(std::process::id());
        assert!(mem.read_u64(8).is_err());
        let mem_file = ProcessMemory::new(std::process::id());
        let mut buf = [0; 8];
        assert!(mem_file.read_mem_file(8, &mut buf).is_err());
    }
}
