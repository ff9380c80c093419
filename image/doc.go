// Package image builds guest bundles: the kernel, initramfs and root
// filesystem that an Ember microVM boots, described by a manifest.
//
// A bundle is a directory with four files:
//
//	vmlinux            uncompressed ELF kernel, which Firecracker and QEMU's PVH boot both take
//	initramfs.cpio.gz  gzip-compressed newc cpio with ember-agent as /init
//	rootfs.ext4        ext4 root filesystem image
//	manifest.json      kernel release, sizes, SHA-256 digests, input digests, boot args
//
// The kernel comes from a vmlinux, a bzImage or a Debian kernel package.
// By default it is Debian's current linux-image-cloud-amd64 kernel, fetched
// with `apt-get download`. A bzImage's compressed payload is found through
// its setup header and decompressed (gzip, xz, zstd, LZ4 legacy frames,
// bzip2 and lzma, detected by magic number). The result must be a 64-bit
// x86 ELF with a PVH entry note or a 64-bit entry point.
//
// Debian's cloud kernel builds virtio_mmio, virtio_blk, virtio_net,
// virtio_console and the vsock transport as modules, so the initramfs
// carries them and their dependencies, uncompressed, under
// /lib/modules/<release>, and lists them dependencies first in
// /etc/ember/modules for the agent to load at boot. Dependencies come from
// modules.dep, or from each module's .modinfo section when the tree has no
// modules.dep, as in a Debian package before depmod has run.
//
// The root filesystem is made by `mkfs.ext4 -d` from e2fsprogs, without root
// privileges or loop mounts, from a directory the caller gives or from a
// small busybox tree. The agent either stays in the initramfs or switches
// into the root filesystem, as ember.mode on the kernel command line
// chooses. The manifest records a recommended command line for each mode.
//
// Outputs are deterministic: the initramfs has sorted entries with fixed
// times and owners, and the ext4 image has a fixed UUID, hash seed and
// timestamps. Build records a digest of its inputs in the manifest and
// skips the work when a bundle with the same digest and intact files is
// already in place.
//
// A typical use:
//
//	agent, err := image.FindAgent()
//	if err != nil {
//		return err
//	}
//	res, err := image.Build(ctx, image.Options{StateDir: stateDir, Agent: agent})
//	if err != nil {
//		return err
//	}
//	fmt.Println(res.Dir, res.Manifest.KernelRelease, res.Cached)
//
// Limits: the builder targets x86_64 guests. It rejects xz-compressed
// kernels that use the x86 BCJ filter (which x86 builds with
// CONFIG_KERNEL_XZ apply), because the xz library reads no BCJ filters, and
// LZO payloads. Both fail with [ErrUnsupportedCompression], and such a
// kernel can be passed as an uncompressed vmlinux instead. The ext4 image is reproducible only for a source tree with
// the same modification times, and the default busybox tree has them all
// at 0.
// Building needs mkfs.ext4 and debugfs from e2fsprogs, and the default
// kernel needs apt-get with a current package list.
package image
