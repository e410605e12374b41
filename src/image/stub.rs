//! Tiny static x86-64 programs made byte by byte: the deliberately broken binaries of test
//! builds (an agent that exits at once, an init that panics the kernel by exiting or that
//! hangs) and the probe init that proves a kernel and initramfs reach userspace.
//!
//! KeelOS images hold no shell, so a broken program cannot be a script; and compiling one would
//! need a toolchain in the build. A handful of machine instructions is exact and reproducible.
//! Pure: returns bytes, runs nothing.

const BASE: u64 = 0x40_0000;
const HEADERS: usize = 64 + 56;

/// What the program does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stub {
    /// `exit(code)` at once. As PID 1 this is a kernel panic ("Attempted to kill init").
    Exit(u8),
    /// Sleep in `pause()` forever (signals that would end it are ignored for PID 1).
    Hang,
    /// A pod sandbox's pause process: sleep in `pause()` until SIGTERM or SIGINT, then
    /// `exit(0)`. The handlers matter: as PID 1 of the pod's PID namespace a process without
    /// them ignores SIGTERM, and containerd would wait out its grace period and SIGKILL it.
    Pause,
    /// Write the message to stdout (the console for PID 1), then power the machine off
    /// (`reboot(POWER_OFF)`); hang if that is refused. Never run it on a host.
    SayAndPowerOff(String),
}

fn hang() -> Vec<u8> {
    // loop: mov eax, 34 (pause); syscall; jmp loop
    vec![0xB8, 34, 0, 0, 0, 0x0F, 0x05, 0xEB, 0xF7]
}

/// SA_RESTORER: x86-64 kernels refuse to deliver a signal to a handler without a restorer.
const SA_RESTORER: u64 = 0x0400_0000;

fn pause() -> Vec<u8> {
    let mut c = Vec::new();
    let mut lea_at = Vec::new();
    for sig in [15u32, 2] {
        // rt_sigaction(sig, &act, NULL, 8)
        c.extend(imm32(&[0xB8], 13)); // mov eax, 13 (rt_sigaction)
        c.extend(imm32(&[0xBF], sig)); // mov edi, sig (SIGTERM, SIGINT)
        lea_at.push(c.len());
        c.extend(imm32(&[0x48, 0x8D, 0x35], 0)); // lea rsi, [rip + act], patched below
        c.extend([0x31, 0xD2]); // xor edx, edx
        c.extend(imm32(&[0x41, 0xBA], 8)); // mov r10d, 8 (sizeof sigset_t)
        c.extend([0x0F, 0x05]); // syscall
    }
    c.extend(hang());
    let handler = c.len();
    c.extend([0x31, 0xFF]); // xor edi, edi
    c.extend(imm32(&[0xB8], 60)); // mov eax, 60 (exit)
    c.extend([0x0F, 0x05]); // syscall
    let restorer = c.len(); // never reached (the handler exits), but the kernel wants one
    c.extend(imm32(&[0xB8], 15)); // mov eax, 15 (rt_sigreturn)
    c.extend([0x0F, 0x05]); // syscall
    let act = c.len();
    let at = |off: usize| BASE + (HEADERS + off) as u64;
    // struct kernel_sigaction { handler, flags, restorer, mask }
    for v in [at(handler), SA_RESTORER, at(restorer), 0] {
        c.extend_from_slice(&v.to_le_bytes());
    }
    for l in lea_at {
        let rel = (act - (l + 7)) as u32;
        c[l + 3..l + 7].copy_from_slice(&rel.to_le_bytes());
    }
    c
}

fn imm32(op: &[u8], v: u32) -> Vec<u8> {
    let mut c = op.to_vec();
    c.extend_from_slice(&v.to_le_bytes());
    c
}

fn code(stub: &Stub) -> Vec<u8> {
    match stub {
        Stub::Exit(status) => {
            let mut c = imm32(&[0xBF], u32::from(*status)); // mov edi, status
            c.extend(imm32(&[0xB8], 60)); // mov eax, 60 (exit)
            c.extend([0x0F, 0x05]); // syscall
            c.extend(hang());
            c
        }
        Stub::Hang => hang(),
        Stub::Pause => pause(),
        Stub::SayAndPowerOff(msg) => {
            let msg = msg.as_bytes();
            let mut c = imm32(&[0xB8], 1); // mov eax, 1 (write)
            c.extend(imm32(&[0xBF], 1)); // mov edi, 1 (stdout)
            let lea_at = c.len();
            c.extend(imm32(&[0x48, 0x8D, 0x35], 0)); // lea rsi, [rip + msg], patched below
            c.extend(imm32(&[0xBA], msg.len() as u32)); // mov edx, len
            c.extend([0x0F, 0x05]); // syscall
            c.extend(imm32(&[0xB8], 169)); // mov eax, 169 (reboot)
            c.extend(imm32(&[0xBF], 0xFEE1_DEAD)); // LINUX_REBOOT_MAGIC1
            c.extend(imm32(&[0xBE], 0x2812_1969)); // LINUX_REBOOT_MAGIC2
            c.extend(imm32(&[0xBA], 0x4321_FEDC)); // LINUX_REBOOT_CMD_POWER_OFF
            c.extend([0x4D, 0x31, 0xD2]); // xor r10, r10
            c.extend([0x0F, 0x05]); // syscall
            c.extend(hang());
            let rel = (c.len() - (lea_at + 7)) as u32;
            c[lea_at + 3..lea_at + 7].copy_from_slice(&rel.to_le_bytes());
            c.extend_from_slice(msg);
            c
        }
    }
}

/// The complete ELF executable.
pub fn elf(stub: &Stub) -> Vec<u8> {
    let code = code(stub);
    let total = (HEADERS + code.len()) as u64;
    let mut e = Vec::with_capacity(total as usize);
    e.extend_from_slice(b"\x7fELF");
    e.extend_from_slice(&[2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]); // 64-bit, LE, v1, SysV
    e.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    e.extend_from_slice(&0x3Eu16.to_le_bytes()); // x86-64
    e.extend_from_slice(&1u32.to_le_bytes());
    e.extend_from_slice(&(BASE + HEADERS as u64).to_le_bytes()); // entry
    e.extend_from_slice(&64u64.to_le_bytes()); // phoff
    e.extend_from_slice(&0u64.to_le_bytes()); // shoff
    e.extend_from_slice(&0u32.to_le_bytes()); // flags
    for v in [64u16, 56, 1, 64, 0, 0] {
        e.extend_from_slice(&v.to_le_bytes()); // ehsize phentsize phnum shentsize shnum shstrndx
    }
    e.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    e.extend_from_slice(&5u32.to_le_bytes()); // R + X
    for v in [0, BASE, BASE, total, total, 0x1000] {
        e.extend_from_slice(&v.to_le_bytes()); // offset vaddr paddr filesz memsz align
    }
    e.extend_from_slice(&code);
    e
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::ExitStatusExt;

    fn write_exe(dir: &std::path::Path, name: &str, s: &Stub) -> std::path::PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, elf(s)).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        p
    }

    #[test]
    fn exit_stub_runs_on_the_host_and_exits_with_its_status() {
        let d = tempfile::tempdir().unwrap();
        for code in [0u8, 1, 42] {
            let p = write_exe(d.path(), &format!("exit{code}"), &Stub::Exit(code));
            let st = std::process::Command::new(&p).status().unwrap();
            assert_eq!(st.code(), Some(i32::from(code)));
        }
    }

    #[test]
    fn hang_stub_keeps_running_until_killed() {
        let d = tempfile::tempdir().unwrap();
        let p = write_exe(d.path(), "hang", &Stub::Hang);
        let mut child = std::process::Command::new(&p).spawn().unwrap();
        // SIGSTOP/SIGCONT interrupt pause() without ending it: the loop must go back to sleep.
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
        assert!(child.try_wait().unwrap().is_none());
        child.kill().unwrap();
        assert_eq!(child.wait().unwrap().signal(), Some(9));
    }

    /// The signal numbers whose handlers /proc/PID/status says are installed (SigCgt).
    fn caught(pid: u32) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let hex = status
            .lines()
            .find_map(|l| l.strip_prefix("SigCgt:"))
            .unwrap()
            .trim();
        u64::from_str_radix(hex, 16).unwrap()
    }

    #[test]
    fn pause_stub_exits_0_on_sigterm_and_sigint_and_sleeps_through_others() {
        use nix::sys::signal::{kill, Signal};
        let d = tempfile::tempdir().unwrap();
        let p = write_exe(d.path(), "pause", &Stub::Pause);
        let want = (1u64 << (15 - 1)) | (1 << (2 - 1));
        for sig in [Signal::SIGTERM, Signal::SIGINT] {
            let mut child = std::process::Command::new(&p).spawn().unwrap();
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            // Signal only once the handlers are in: before that SIGTERM would kill it.
            let t = std::time::Instant::now();
            while caught(child.id()) & want != want {
                assert!(t.elapsed().as_secs() < 10, "handlers never installed");
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            kill(pid, Signal::SIGSTOP).unwrap();
            kill(pid, Signal::SIGCONT).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(20));
            assert!(
                child.try_wait().unwrap().is_none(),
                "ended by SIGSTOP/SIGCONT"
            );
            kill(pid, sig).unwrap();
            let st = child.wait().unwrap();
            assert_eq!(st.code(), Some(0), "{sig}: {st:?}");
        }
    }

    #[test]
    fn stubs_are_static_elf_executables() {
        for s in [
            Stub::Exit(1),
            Stub::Hang,
            Stub::Pause,
            Stub::SayAndPowerOff("hello\n".into()),
        ] {
            let b = elf(&s);
            let d = crate::image::elf::dynamic(&b).unwrap();
            assert_eq!(d, crate::image::elf::Dynamic::default(), "{s:?}");
        }
        let b = elf(&Stub::SayAndPowerOff("keel probe\n".into()));
        assert!(b.ends_with(b"keel probe\n"));
    }
}
