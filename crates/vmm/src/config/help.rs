//! `-h` and `-version` texts.

/// QEMU's version this command line follows.
pub const QEMU_VERSION: &str = "10.0.2";

/// The `-version` text.
pub fn version_text() -> String {
    format!(
        "QEMU emulator version {QEMU_VERSION} (rqemu {})\nCopyright (c) 2003-2025 Fabrice Bellard and the QEMU Project developers\n",
        env!("CARGO_PKG_VERSION")
    )
}

/// The `-h` text: the options this machine understands, in QEMU's layout.
pub fn help_text() -> String {
    let mut s = version_text();
    s.push_str(
        "usage: rqemu-system-x86_64 [options] [disk_image]

'disk_image' is a raw hard disk image for IDE hard disk 0

Standard options:
-h or -help     display this help and exit
-version        display version information and exit
-machine [type=]name[,prop[=value][,...]]
                selects emulated machine ('-machine help' for list)
                (pc and q35 name the same KVM machine here)
-cpu cpu        select CPU ('-cpu help' for list): host, max or a named model
-accel [accel=]kvm
                select accelerator (only kvm is available)
-smp [[cpus=]n][,maxcpus=maxcpus][,sockets=sockets][,dies=dies][,cores=cores][,threads=threads]
                set the number of initial CPUs to 'n' [default=1]
-m [size=]megs[,slots=n,maxmem=size]
                configure guest RAM (default 128 MiB; suffixes k, M, G, T)
-name string1[,guest=string1]
                set the name of the guest
-uuid %08x-%04x-%04x-%04x-%012x
                specify machine UUID (seen by the guest through SMBIOS)

Block device options:
-hda/-hdb/-hdc/-hdd file  use 'file' as hard disk 0/1/2/3 image
-cdrom file     use 'file' as CD-ROM image (a read-only disk)
-drive [file=file][,if=type][,bus=n][,unit=m][,media=d][,index=i]
       [,cache=writethrough|writeback|none|directsync|unsafe][,format=f]
       [,snapshot=on|off][,rerror=ignore|stop|report]
       [,werror=ignore|stop|report|enospc][,id=name]
       [,aio=threads|native|io_uring][,readonly=on|off]
       [,discard=ignore|unmap][,detect-zeroes=on|off|unmap]
       [,serial=s][,addr=A]
       [[,bps=b]|[[,bps_rd=r][,bps_wr=w]]]
       [[,iops=i]|[[,iops_rd=r][,iops_wr=w]]]
       [,throttling.bps-total=b][,throttling.iops-total=i]...
                use 'file' as a drive image (if=virtio or if=none)
-snapshot       write to temporary files instead of disk image files
-device virtio-blk-pci,drive=id[,serial=s][,iothread=id][,num-queues=n][,queue-size=n]
                add a virtio disk for an if=none drive
-object iothread,id=id
                create an I/O thread for virtio disks

Display options:
-display none   no display (the only one)
-nographic      no display; serial port on stdio
-vga none       no VGA card

Linux boot specific:
-kernel bzImage use 'bzImage' as kernel image
-append cmdline use 'cmdline' as kernel command line
-initrd file    use 'file' as initial ram disk

Debug/Expert options:
-serial dev     redirect the serial port to char device 'dev'
                (stdio, file:path, null, none; up to 4 ports)
-rtc [base=utc|localtime|datetime][,clock=host|rt|vm][,driftfix=none|slew]
                set the RTC base and clock
-no-reboot      exit instead of rebooting
-no-shutdown    accepted for compatibility
-enable-kvm     enable KVM full virtualization support

During -nographic emulation on a terminal, Ctrl-a x exits.
",
    );
    s
}
