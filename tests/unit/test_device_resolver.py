"""Which device is this volume: pure decisions over a device tree snapshot."""

from agent.volumes.device_resolver import (DeviceTree, acceptable_path, by_id_names, instance_store_disks,
                                           nvme_serial, resolve, xen_name)

VID = "vol-0123456789abcdef0"
SERIAL = "vol0123456789abcdef0"
LINK = "nvme-Amazon_Elastic_Block_Store_vol0123456789abcdef0"


def tree(**kw):
    base = dict(dev_root="/dev", by_id={}, serials={}, models={}, nodes={}, block_paths=())
    base.update(kw)
    return DeviceTree(**base)


def test_serial_is_volume_id_without_dash():
    assert nvme_serial(VID) == SERIAL
    assert by_id_names(VID) == [LINK, LINK + "_1", LINK + "-ns-1"]


def test_by_id_symlink_with_matching_serial():
    t = tree(by_id={LINK: "/dev/nvme1n1"}, serials={"nvme1n1": SERIAL}, nodes={"nvme1n1": "/dev/nvme1n1"},
             block_paths=("/dev/nvme1n1",))
    r = resolve(VID, t)
    assert r.found and r.device == "/dev/nvme1n1" and r.how == "by-id symlink"


def test_stale_symlink_is_refused_with_what_the_device_really_is():
    t = tree(by_id={LINK: "/dev/nvme1n1"}, serials={"nvme1n1": "vol0fffffffffffffff0"},
             nodes={"nvme1n1": "/dev/nvme1n1"}, block_paths=("/dev/nvme1n1",))
    r = resolve(VID, t)
    assert not r.found
    assert "serial is vol0fffffffffffffff0" in r.refused and "stale symlink" in r.refused


def test_stale_symlink_but_the_right_device_elsewhere_is_found_by_serial():
    t = tree(by_id={LINK: "/dev/nvme1n1"}, serials={"nvme1n1": "vol0fffffffffffffff0", "nvme2n1": SERIAL},
             nodes={"nvme1n1": "/dev/nvme1n1", "nvme2n1": "/dev/nvme2n1"}, block_paths=("/dev/nvme1n1", "/dev/nvme2n1"))
    r = resolve(VID, t)
    assert r.found and r.device == "/dev/nvme2n1" and r.how == "sysfs serial"


def test_symlink_to_a_non_dev_path_is_refused():
    t = tree(by_id={LINK: "/tmp/evil"}, block_paths=("/tmp/evil",))
    r = resolve(VID, t)
    assert not r.found and "not of the form /dev/NAME" in r.refused
    t = tree(by_id={LINK: "/dev/mapper/x"}, block_paths=("/dev/mapper/x",), serials={"x": SERIAL})
    assert not resolve(VID, t).found


def test_symlink_to_something_that_is_not_a_block_device_is_stale():
    t = tree(by_id={LINK: "/dev/nvme1n1"}, serials={"nvme1n1": SERIAL})
    r = resolve(VID, t)
    assert not r.found and "not a block device" in r.refused


def test_serial_suffix_variant_links():
    t = tree(by_id={LINK + "-ns-1": "/dev/nvme3n1"}, serials={"nvme3n1": SERIAL}, nodes={"nvme3n1": "/dev/nvme3n1"},
             block_paths=("/dev/nvme3n1",))
    assert resolve(VID, t).device == "/dev/nvme3n1"


def test_no_udev_finds_by_sysfs_serial():
    t = tree(serials={"nvme1n1": SERIAL}, nodes={"nvme1n1": "/dev/nvme1n1"}, block_paths=("/dev/nvme1n1",))
    assert resolve(VID, t).device == "/dev/nvme1n1"


def test_xen_name_of_attach_device():
    assert xen_name("/dev/sdf") == "xvdf"
    assert xen_name("/dev/xvdg") == "xvdg"
    assert xen_name("/dev/nvme1n1") == ""
    t = tree(nodes={"xvdf": "/dev/xvdf"}, block_paths=("/dev/xvdf",))
    r = resolve(VID, t, attach_device="/dev/sdf")
    assert r.found and r.device == "/dev/xvdf" and r.how == "xen name"


def test_xen_name_with_a_different_serial_is_refused():
    t = tree(nodes={"xvdf": "/dev/xvdf"}, serials={"xvdf": "vol0fffffffffffffff0"}, block_paths=("/dev/xvdf",))
    r = resolve(VID, t, attach_device="/dev/sdf")
    assert not r.found and "not " + SERIAL in r.refused


def test_not_found_says_where_it_looked():
    r = resolve(VID, tree())
    assert not r.found and not r.refused
    assert LINK in r.looked and SERIAL in r.looked


def test_acceptable_paths():
    assert acceptable_path("/dev/nvme1n1", "/dev")
    assert acceptable_path("/tmp/t/dev/loop3", "/tmp/t/dev")
    assert not acceptable_path("/dev/disk/by-id/x", "/dev")
    assert not acceptable_path("/etc/passwd", "/dev")


def test_instance_store_disks_by_model():
    t = tree(models={"nvme1n1": "Amazon EC2 NVMe Instance Storage", "nvme2n1": "Amazon Elastic Block Store",
                     "nvme3n1": "Amazon EC2 NVMe Instance Storage"},
             nodes={"nvme1n1": "/dev/nvme1n1", "nvme2n1": "/dev/nvme2n1", "nvme3n1": "/dev/nvme3n1"})
    assert instance_store_disks(t) == ["/dev/nvme1n1", "/dev/nvme3n1"]


def test_xen_name_that_is_a_symlink_reads_the_serial_of_its_kernel_name():
    # /dev/xvdf -> nvme2n1 (amazon-ec2-utils makes such links on Nitro): sysfs knows only nvme2n1, whose
    # serial is another volume's. Looking the serial up under "xvdf" found none and took somebody else's disk.
    t = tree(nodes={"xvdf": "/dev/nvme2n1", "nvme2n1": "/dev/nvme2n1"}, serials={"nvme2n1": "vol0fffffffffffffff0"},
             block_paths=("/dev/nvme2n1",))
    r = resolve(VID, t, attach_device="/dev/sdf")
    assert not r.found and "vol0fffffffffffffff0" in r.refused and "/dev/nvme2n1" in r.refused


def test_xen_name_linked_to_a_non_xen_disk_without_a_serial_is_refused():
    t = tree(nodes={"xvdf": "/dev/sda"}, block_paths=("/dev/sda",))
    r = resolve(VID, t, attach_device="/dev/sdf")
    assert not r.found and "not a Xen disk" in r.refused
