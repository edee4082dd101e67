#!/usr/bin/env bash
# Installs the .deb into a fresh Debian 12 root (debootstrap --variant=minbase, kept pristine as a
# tarball in target/package so a rerun extracts a new copy instead of fetching again), with apt
# resolving its Depends from the archive, then checks what an operator relies on: the binary
# runs, the first install wrote a key (mode 0600), the unit's ExecStartPre accepts the shipped
# config, systemd-analyze verifies the unit, the unit's ExecStart boots the daemon to ready in a
# network namespace of its own, man pages and completions are in place, and purge removes it.
# Needs root (chroot, mounts, namespaces). Usage: packaging/test-package.sh DEB
set -euo pipefail
deb=$(realpath "$1")
cd "$(dirname "$0")/.."
work=target/package
root=$work/root
tarball=$work/bookworm-minbase.tar
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
t0=$(date +%s)
say() { echo "package-test [$(( $(date +%s) - t0 )) s]: $*"; }
fail() { echo "package-test: FAILED: $*" >&2; exit 1; }

cleanup() {
    if [ -n "${root:-}" ]; then for m in proc sys dev; do umount -l "$root/$m" 2>/dev/null || true; done; fi
}
trap cleanup EXIT
cleanup
# Never delete through a mount (a bound /dev would be the host's).
if grep -q " $(realpath -m "$root")/" /proc/self/mounts; then fail "something is still mounted under $root"; fi
rm -rf "$root"
if [ ! -s "$tarball" ]; then
    say "debootstrap bookworm (minbase) from $mirror"
    mkdir -p "$work/fresh" && rm -rf "$work/fresh"
    debootstrap --variant=minbase bookworm "$work/fresh" "$mirror" > "$work/debootstrap.log" 2>&1 \
        || { tail -20 "$work/debootstrap.log"; fail "debootstrap (log: $work/debootstrap.log)"; }
    tar -C "$work/fresh" -cf "$tarball" . && rm -rf "$work/fresh"
fi
mkdir -p "$root" && tar -C "$root" -xf "$tarball"
mount -t proc proc "$root/proc"
mount --rbind /sys "$root/sys"
mount --bind /dev "$root/dev"
cp /etc/resolv.conf "$root/etc/resolv.conf"
cp "$deb" "$root/tmp/dwcp.deb"
in_root() { chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive "$@"; }

say "apt-get install ./dwcp.deb (its Depends from the archive)"
in_root apt-get update -qq > "$work/apt.log" 2>&1 || { cat "$work/apt.log"; fail "apt-get update in the fresh root"; }
in_root apt-get install -y -q --no-install-recommends /tmp/dwcp.deb > "$work/install.log" 2>&1 \
    || { tail -30 "$work/install.log"; fail "installing the package"; }
grep -q "wrote a new pre-shared key" "$work/install.log" || fail "postinst did not say it wrote a key"

say "dwcp --version"
v=$(in_root dwcp --version) || fail "dwcp --version"
[[ "$v" == "dwcp "* ]] || fail "dwcp --version printed: $v"
echo "  $v"

say "the key, the config and the unit's checks"
mode=$(stat -c %a "$root/etc/dwcp/key")
[ "$mode" = 600 ] || fail "/etc/dwcp/key has mode $mode, not 600"
unit=$root/usr/lib/systemd/system/dwcp.service
[ -f "$unit" ] || fail "no systemd unit at /usr/lib/systemd/system/dwcp.service"
pre=$(sed -n 's/^ExecStartPre=//p' "$unit")
start=$(sed -n 's/^ExecStart=//p' "$unit")
[ -n "$pre" ] && [ -n "$start" ] || fail "the unit has no ExecStartPre/ExecStart"
in_root $pre || fail "the unit's ExecStartPre ($pre) refused the shipped config"
# systemd's own check of the unit, against the root's systemd (installed for it; the package does
# not need it). Man pages are not looked up: minbase has no man.
in_root apt-get install -y -q --no-install-recommends systemd > "$work/systemd.log" 2>&1 || { tail -20 "$work/systemd.log"; fail "installing systemd in the root"; }
out=$(in_root systemd-analyze verify --man=no /usr/lib/systemd/system/dwcp.service 2>&1) || fail "systemd-analyze verify: $out"
[ -z "$out" ] || echo "  systemd-analyze verify: $out"

say "the unit's ExecStart boots the daemon to ready (own network namespace)"
unshare --net bash -c '
    set -e
    ip link set lo up
    chroot "$1" /usr/bin/env -i PATH=/usr/bin:/bin $2 > "$3/daemon.log" 2>&1 &
    pid=$!
    for i in $(seq 1 100); do
        if { exec 3<>/dev/tcp/127.0.0.1/7471; } 2>/dev/null; then
            printf "GET /readyz HTTP/1.0\r\n\r\n" >&3
            if head -1 <&3 | grep -q " 200"; then echo "  ready after $((i * 100)) ms"; kill $pid; wait $pid 2>/dev/null || true; exit 0; fi
            exec 3>&-
        fi
        kill -0 $pid 2>/dev/null || { echo "the daemon exited:"; cat "$3/daemon.log"; exit 1; }
        sleep 0.1
    done
    echo "not ready in 10 s:"; cat "$3/daemon.log"; kill $pid; exit 1
' _ "$root" "$start" "$work" || fail "the daemon did not become ready"

say "man pages and completions"
for f in usr/share/man/man1/dwcp.1.gz usr/share/man/man1/dwcp-send.1.gz usr/share/man/man1/dwcp-migrate.1.gz \
         usr/share/bash-completion/completions/dwcp usr/share/zsh/vendor-completions/_dwcp usr/share/fish/vendor_completions.d/dwcp.fish; do
    [ -s "$root/$f" ] || fail "/$f missing"
done
zcat "$root/usr/share/man/man1/dwcp-send.1.gz" | grep -q "unix:PATH" || fail "dwcp-send(1) does not describe the sources"
bash -c "source '$root/usr/share/bash-completion/completions/dwcp' && complete -p dwcp" > /dev/null || fail "the bash completion does not load"

say "purge"
in_root apt-get purge -y -q dwcp > "$work/purge.log" 2>&1 || { tail -20 "$work/purge.log"; fail "apt-get purge dwcp"; }
[ ! -e "$root/usr/bin/dwcp" ] || fail "purge left /usr/bin/dwcp"
say "passed: $(basename "$deb") installs, runs, boots to ready and purges in a fresh Debian 12 root"
