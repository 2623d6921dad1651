//! rqemu-system-x86_64's command line: help and version, and refusals with QEMU's
//! messages (these exit before KVM is touched, so they run anywhere).

use std::process::Command;

fn vmm(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_rqemu-system-x86_64"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn version_and_help() {
    let (rc, out, _) = vmm(&["-version"]);
    assert_eq!(rc, 0);
    assert!(
        out.starts_with("QEMU emulator version 10.0.2 (rqemu "),
        "{out}"
    );
    let (rc, out, _) = vmm(&["-h"]);
    assert_eq!(rc, 0);
    assert!(out.contains("usage: rqemu-system-x86_64 [options] [disk_image]"));
    assert!(out.contains("-drive [file=file]"));
    let (rc, out, _) = vmm(&["-machine", "help"]);
    assert_eq!(rc, 0);
    assert!(out.contains("q35"));
}

#[test]
fn refusals_name_the_option() {
    let cases: &[(&[&str], &str)] = &[
        (&["-kernel", "k", "-drive", "file=x.img,if=ide"],
         "rqemu-system-x86_64: -drive file=x.img,if=ide: machine type does not support if=ide"),
        (&["-kernel", "k", "-drive", "file=x.img,if=bogus"],
         "rqemu-system-x86_64: -drive file=x.img,if=bogus: unsupported bus type 'bogus'\n"),
        (&["-kernel", "k", "-drive", "file=x.img,aio=native"],
         "rqemu-system-x86_64: -drive file=x.img,aio=native: aio=native was specified, but it requires cache.direct=on, which was not specified.\n"),
        (&["-kernel", "k", "-drive", "file=x.img,cache=sometimes"],
         "rqemu-system-x86_64: -drive file=x.img,cache=sometimes: Invalid cache option: sometimes\n"),
        (&["-kernel", "k", "-uuid", "nope"],
         "rqemu-system-x86_64: Fail to parse UUID string. Wrong format.\n"),
        (&["-kernel", "k", "-frobnicate"], "rqemu-system-x86_64: -frobnicate: invalid option\n"),
        (&["-kernel", "k", "-device", "e1000"],
         "rqemu-system-x86_64: -device e1000: 'e1000' is not a valid device model name\n"),
        (&["-kernel", "k", "-smp", "cpus=3,sockets=2,cores=1"],
         "rqemu-system-x86_64: -smp cpus=3,sockets=2,cores=1: Invalid CPU topology"),
        (&["-kernel", "k", "-rtc", "base=2006-13-01"],
         "rqemu-system-x86_64: -rtc base=2006-13-01: invalid datetime format"),
        (&["-kernel", "k", "-drive", "if=none,file=a,id=d", "-device", "virtio-blk-pci,drive=x"],
         "rqemu-system-x86_64: -device virtio-blk-pci,drive=x: Property 'virtio-blk-pci.drive' can't find value 'x'\n"),
        (&["-kernel", "k", "-drive", "file=x.img,if=virtio,index=1,unit=0"],
         "rqemu-system-x86_64: -drive file=x.img,if=virtio,index=1,unit=0: index cannot be used with bus and unit\n"),
        (&["-kernel", "k", "-drive", "file=/dev/null,format=raw,if=virtio,index=3",
           "-drive", "file=/dev/null,format=raw,if=virtio,index=3"],
         "rqemu-system-x86_64: -drive file=/dev/null,format=raw,if=virtio,index=3: drive with bus=0, unit=3 (index=3) exists\n"),
        (&["-kernel", "k", "-drive", "file=/nonexistent/disk.qcow2,if=virtio"],
         "rqemu-system-x86_64: -drive file=/nonexistent/disk.qcow2,if=virtio: Could not open '/nonexistent/disk.qcow2': No such file or directory\n"),
    ];
    for (args, want) in cases {
        let (rc, _, err) = vmm(args);
        assert_eq!(rc, 1, "{args:?}: {err}");
        // Opening a missing image happens after KVM is opened; hosts without KVM say so.
        if err.contains("Could not access KVM kernel module") {
            continue;
        }
        let err = err
            .lines()
            .filter(|l| !l.contains("warning: /dev/kvm is kvm_pvm"))
            .collect::<Vec<_>>()
            .join("\n")
            + "\n";
        assert!(
            err.starts_with(want),
            "{args:?}:\n got: {err}\nwant: {want}"
        );
    }
}
