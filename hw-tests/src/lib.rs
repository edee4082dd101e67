//! Hardware rigs (not built yet; issue "Rigs that behave like the real world"). It will hold the
//! WAN link emulator (TUN devices in two network namespaces and a timed-queue forwarder), the
//! soft-RoCE QEMU guest runner, and the guest-RAM corpus capture, each started from a make target.
