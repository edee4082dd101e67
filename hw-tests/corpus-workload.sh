#!/bin/bash
# Runs inside the guest (hw-tests/corpus starts it): fills memory the way a busy server does,
# signals /vmout/ready when warm, keeps mutating its state until /vmout/stop appears.
#   fileserver: page cache from reading real files, gzip writing a compressed archive to tmpfs,
#               a Python process holding an index (dicts, strings) of real documents, updating it.
#   database:   an in-memory SQLite database of real text rows and random (encrypted-like) blobs,
#               updated continuously, plus AES-encrypted data in tmpfs written by openssl.
set -u
name=$1
mkdir -p /tmp/w
python3 -c 'import sys' || { echo "python3 missing on the host root" >&2; exit 1; }
case $name in
fileserver)
    # The host root arrives over 9p without caching, so the files a server would serve are first
    # copied into tmpfs (page cache), then read back and archived from there.
    mkdir -p /tmp/w/files
    (tar cf - /usr/lib/python3.11 /usr/share/doc /usr/share/man 2>/dev/null | head -c 200000000 | tar xf - -C /tmp/w/files 2>/dev/null
     find /tmp/w/files -type f -print0 | xargs -0 cat > /dev/null 2>&1
     tar cf - -C /tmp/w/files . 2>/dev/null | gzip -6 > /tmp/w/archive.tar.gz) &
    python3 - <<'PY' &
import os, time, collections
docs, words = {}, collections.Counter()
for root, _, files in os.walk('/usr/share'):
    for f in files:
        p = os.path.join(root, f)
        try:
            t = open(p, 'rb').read(100000).decode('latin-1')
        except Exception:
            continue
        docs[p] = t
        words.update(t.split()[:2000])
        if len(docs) >= 6000:
            break
    if len(docs) >= 6000:
        break
open('/tmp/w/heap-ready', 'w').write(str(len(docs)))
keys, i = list(docs), 0
while not os.path.exists('/vmout/stop'):
    k = keys[i % len(keys)]
    docs[k] = docs[k][::-1]
    words['%d' % i] += 1
    i += 1
    if i % 200 == 0:
        time.sleep(0.01)
PY
    ;;
database)
    (head -c 120000000 /dev/zero | openssl enc -aes-256-ctr -pbkdf2 -pass pass:corpus -out /tmp/w/vault.bin 2>/dev/null) &
    python3 - <<'PY' &
import os, sqlite3, time, random
db = sqlite3.connect(':memory:')
db.execute('create table docs(id integer primary key, path text, body text, blob blob)')
n = 0
for root, _, files in os.walk('/usr/share/doc'):
    for f in files:
        p = os.path.join(root, f)
        try:
            t = open(p, 'rb').read(50000).decode('latin-1')
        except Exception:
            continue
        db.execute('insert into docs(path, body, blob) values (?, ?, ?)', (p, t, os.urandom(random.randint(512, 8192))))
        n += 1
        if n >= 12000:
            break
    if n >= 12000:
        break
db.execute('create index i_path on docs(path)')
db.commit()
open('/tmp/w/heap-ready', 'w').write(str(n))
i = 0
while not os.path.exists('/vmout/stop'):
    db.execute('update docs set body = ? || body, blob = ? where id = ?', ('x%d ' % i, os.urandom(1024), 1 + i % n))
    i += 1
    if i % 100 == 0:
        db.commit()
        time.sleep(0.01)
PY
    ;;
*) echo "unknown workload $name" >&2; exit 2 ;;
esac
# Warm when the heap is built and the background writers have had their time.
for _ in $(seq 600); do [ -f /tmp/w/heap-ready ] && break; sleep 0.5; done
sleep 5
sync
echo "$(date +%s) $(cat /tmp/w/heap-ready) $(free -m | awk '/Mem:/{print $3" MiB used, "$6" MiB cache"}')" > /vmout/ready
for _ in $(seq 1200); do [ -f /vmout/stop ] && break; sleep 0.25; done
kill $(jobs -p) 2>/dev/null
exit 0
