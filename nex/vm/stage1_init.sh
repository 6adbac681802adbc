#!/bin/sh
# nex guest stage 1: the initramfs's /init, run by busybox sh as PID 1 (see nex/vm/image.py).
#
# It loads the virtio and overlay modules listed in /lib/modules/load (in dependency order), mounts
# the root filesystem (/dev/vda, ext4) read-only under a tmpfs overlay, and hands over to the agent:
#   exec switch_root /newroot /usr/bin/python3.11 -I -m nex.agent.guest
# Kernel command line words it reads:
#   nex.probe=1     print "nex-probe-ok" and power off at once (a check that the accelerator runs a guest)
#   nex.check=1     hand over to a python that imports nex.agent.main, prints "nex-python-ok" and
#                   powers off, instead of the agent (a check of the image)
#   nex.rw_mib=N    size of the tmpfs that holds the overlay's writable layer [default: the kernel's]
# On any failure it prints one line "nex-init: WHAT FAILED" and powers off (ACPI, which ends qemu at
# once; a reboot, the fallback, ends a VM run with -no-reboot but only after the kernel has tried its
# reboot methods in turn, seconds under TCG): never a shell on the console.

PATH=/bin
export PATH

fail() {
	echo "nex-init: $*"
	poweroff -f
	reboot -f
	exit 1
}

mount -t proc proc /proc || fail "cannot mount /proc"
read -r cmdline </proc/cmdline || fail "cannot read /proc/cmdline"
for word in $cmdline; do
	if [ "$word" = nex.probe=1 ]; then
		echo nex-probe-ok
		poweroff -f
		exit 0
	fi
done

mount -t sysfs sysfs /sys || fail "cannot mount /sys"
mount -t devtmpfs devtmpfs /dev || fail "cannot mount /dev"

while read -r module; do
	insmod "/lib/modules/$module.ko" || fail "cannot load module $module"
done </lib/modules/load

check=0
rw_options=mode=0755
for word in $cmdline; do
	case "$word" in
	nex.check=1) check=1 ;;
	nex.rw_mib=*)
		mib="${word#nex.rw_mib=}"
		case "$mib" in
		'' | *[!0-9]*) fail "bad nex.rw_mib: $mib" ;;
		esac
		rw_options="$rw_options,size=${mib}m"
		;;
	esac
done

# virtio_blk names the disk as it probes, in insmod or just after: wait for it, 5 s at most.
tries=0
while [ ! -b /dev/vda ]; do
	tries=$((tries + 1))
	[ "$tries" -le 500 ] || fail "no root disk /dev/vda after 5 s"
	usleep 10000
done

mount -t ext4 -o ro /dev/vda /ro || fail "cannot mount the root filesystem /dev/vda (ext4, read-only)"
mount -t tmpfs -o "$rw_options" tmpfs /rw || fail "cannot mount the writable tmpfs ($rw_options)"
mkdir -p /rw/upper /rw/work || fail "cannot make the overlay's directories"
mount -t overlay -o lowerdir=/ro,upperdir=/rw/upper,workdir=/rw/work overlay /newroot ||
	fail "cannot mount the overlay root"
[ -x /newroot/usr/bin/python3.11 ] || fail "no /usr/bin/python3.11 in the root filesystem"
for point in proc sys dev; do
	mount --move "/$point" "/newroot/$point" || fail "cannot move /$point into the new root"
done

PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
HOME=/root
export PATH HOME
if [ "$check" = 1 ]; then
	exec switch_root /newroot /usr/bin/python3.11 -I -c "import ctypes, nex.agent.main
print('nex-python-ok', flush=True)
ctypes.CDLL(None).reboot(0x4321FEDC)"
	fail "cannot switch to the root filesystem"
fi
guest=/newroot/usr/local/lib/python3.11/dist-packages/nex/agent/guest
[ -e "$guest.py" ] || [ -e "$guest/__main__.py" ] || fail "no nex.agent.guest in the root filesystem"
exec switch_root /newroot /usr/bin/python3.11 -I -m nex.agent.guest
fail "cannot switch to the root filesystem"
