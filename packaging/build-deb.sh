#!/bin/sh
# Build tokenlife's wheel and its Debian package from this tree:
#
#     sh packaging/build-deb.sh [OUTDIR]        (default OUTDIR: dist/)
#
# writes OUTDIR/tokenlife-VERSION-py3-none-any.whl (for pip users), its
# dependencies as binary wheels in OUTDIR/wheels/ (so that pip installs
# offline), and OUTDIR/tokenlife_VERSION-REV_ARCH.deb (for Debian).  The .deb is
# self-contained, the way dh-virtualenv builds them: a venv in /opt/tokenlife
# made with Debian's own /usr/bin/python3, holding the wheel and every Python
# dependency as pip resolves it from PyPI (several are not in Debian at the
# versions needed), plus the systemd, Slurm and PAM files of systemd/.  Read
# packaging/README.md for the layout and the maintainer scripts.
#
# Needs: /usr/bin/python3 with venv (python3-venv), dpkg-deb, make, a C
# compiler and libpam's headers (gcc libc6-dev libpam0g-dev: the PAM
# module, producer/pam), and PyPI or a
# wheelhouse (pip's own settings apply: PIP_INDEX_URL, PIP_FIND_LINKS,
# PIP_NO_INDEX, PIP_CONSTRAINT to pin the versions to a tested set).  Not root:
# dpkg-deb --root-owner-group makes every file root's.  pip's cache is reused,
# so a second build downloads nothing.
#
# Environment: TOKENLIFE_DEB_REVISION (default 1); DEBFULLNAME and DEBEMAIL
# for the Maintainer field.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
tree=$(dirname "$here")
out=${1:-$tree/dist}
revision=${TOKENLIFE_DEB_REVISION:-1}
# The interpreter the venv is tied to, by its versioned name: its python
# symlinks must survive a change of Debian's default python3.
python=$(readlink -f /usr/bin/python3)
pyname=$(basename "$python")                 # python3.11
prefix=/opt/tokenlife

version=$("$python" -c 'import sys, tomllib; print(tomllib.load(sys.stdin.buffer)["project"]["version"])' <"$tree/pyproject.toml")
arch=$(dpkg --print-architecture)
mkdir -p "$out"
out=$(cd "$out" && pwd)

work=$(mktemp -d "${TMPDIR:-/tmp}/tokenlife-deb.XXXXXX")
trap 'rm -rf "$work"' EXIT
stage=$work/root
venv=$stage$prefix
say() { printf 'build-deb: %s\n' "$*" >&2; }

# 1. The wheel, from a copy of the tree: a build in place would leave build/
#    and egg-info behind in a tree that others work in.
say "wheel tokenlife $version"
mkdir "$work/src"
(cd "$tree" && tar -cf - --exclude=__pycache__ --exclude='*.egg-info' \
    pyproject.toml README.md tokenlife producer repository transfer client_engine) |
    tar -xf - -C "$work/src"
"$python" -m venv "$venv"
pip() { "$venv/bin/python" -m pip --disable-pip-version-check --no-input -q "$@"; }
wheel=tokenlife-$version-py3-none-any.whl
rm -f "$out/$wheel"
pip wheel --no-deps --wheel-dir "$out" "$work/src"
[ -f "$out/$wheel" ] || { say "pip did not write $wheel"; exit 1; }

# 2. Its dependencies as binary wheels only (no compiler, no sdist builds),
#    then the venv from them alone, without byte-code (postinst compiles it
#    in place, so the .pyc files name the installed paths).
say "dependencies"
rm -rf "$out/wheels"
pip wheel --only-binary=:all: --wheel-dir "$out/wheels" "$out/$wheel"
rm -f "$out/wheels/$wheel"
pip install --no-index --find-links "$out/wheels" --no-compile "$out/$wheel"
# pip and setuptools have no business in a tree that dpkg owns.
pip uninstall -y pip setuptools 2>/dev/null || true
find "$venv" -depth -name __pycache__ -type d -exec rm -rf {} +
rm -f "$venv"/bin/activate* "$venv"/bin/Activate.ps1
# The staging prefix in scripts' #! lines and pyvenv.cfg becomes the real one.
grep -rlF "$stage" "$venv" | while IFS= read -r f; do
    sed -i "s|$stage$prefix|$prefix|g" "$f"
done
if grep -rqF "$work" "$stage"; then
    say "the staging path is still in: $(grep -rlF "$work" "$stage" | head -3)"
    exit 1
fi
"$venv/bin/python" -c 'import tokenlife, producer, repository, transfer, client_engine'

# 3. The rest of the tree.  The shipped files name pip's /usr/local/bin; the
#    package's commands are in /usr/bin.
say "system files"
mkdir -p "$stage/usr/bin"
ln -s "$prefix/bin/tokenlife" "$stage/usr/bin/tokenlife"
ln -s "$prefix/bin/tokenlife-engine" "$stage/usr/bin/tokenlife-engine"
fix() { sed 's|/usr/local/bin/tokenlife|/usr/bin/tokenlife|g' "$1" >"$2"; }
units=$stage/usr/lib/systemd/system
share=$stage/usr/share/tokenlife
doc=$stage/usr/share/doc/tokenlife
mkdir -p "$units" "$stage/usr/lib/sysusers.d" "$stage/usr/lib/tmpfiles.d" \
    "$share/slurm" "$share/pam.d" "$doc" "$stage/etc/tokenlife" "$stage/DEBIAN"
for f in "$tree"/systemd/*.service "$tree"/systemd/*.timer; do
    fix "$f" "$units/$(basename "$f")"
done
cp "$tree/systemd/tokenlife.sysusers.conf" "$stage/usr/lib/sysusers.d/tokenlife.conf"
cp "$tree/systemd/tokenlife.tmpfiles.conf" "$stage/usr/lib/tmpfiles.d/tokenlife.conf"
for f in "$tree"/systemd/slurm/*; do
    fix "$f" "$share/slurm/$(basename "$f")"
done
fix "$tree/systemd/pam.d/tokenlife" "$share/pam.d/tokenlife"
# The native PAM module, where Debian's PAM looks (/usr/lib/<multiarch>/security).
say "pam_tokenlife.so"
make -s -C "$tree/producer/pam" OUT="$work" DESTDIR="$stage" install
mkdir -p "$share/profile.d"                    # for login nodes, not activated
cp "$tree/systemd/profile.d/tokenlife.sh" "$share/profile.d/tokenlife.sh"
# The sample configuration, every key at its default: a conffile.
cp "$tree/tokenlife/data/tokenlife.toml" "$stage/etc/tokenlife/tokenlife.toml"
# Uncompressed: the units' Documentation= lines point at them.
cp "$tree"/docs/*.md "$tree/README.md" "$tree/NEWS.md" "$doc/"
for f in "$tree"/systemd/prometheus/*; do      # alert rules, when the tree has them
    [ -f "$f" ] || continue
    mkdir -p "$share/prometheus"
    cp "$f" "$share/prometheus/"
done
for page in "$tree"/docs/man/*.[1-8]; do       # man pages, when the tree has them
    [ -f "$page" ] || continue
    mandir=$stage/usr/share/man/man${page##*.}
    mkdir -p "$mandir"
    gzip -9n <"$page" >"$mandir/${page##*/}.gz"
done
cp "$here/debian/copyright" "$doc/copyright"

# A changelog, as every Debian package has; the project's is NEWS.md.
printf '%s\n\n  * %s\n\n -- %s  %s\n' \
    "tokenlife ($version-$revision) unstable; urgency=medium" \
    "Built from the tree by packaging/build-deb.sh; changes: NEWS.md." \
    "${DEBFULLNAME:-tokenlife maintainers} <${DEBEMAIL:-root@localhost}>" \
    "$(date -R)" | gzip -9n >"$doc/changelog.Debian.gz"

# 4. Control files.  Everything readable by everyone (job users run the
#    engine), writable by root only; shared libraries are not programs.
chmod -R u+rwX,go+rX,go-w "$stage"
find "$venv" -type f -name '*.so*' -exec chmod 0644 {} +
chmod 0755 "$share"/slurm/*.sh
printf '%s\n' /etc/tokenlife/tokenlife.toml >"$stage/DEBIAN/conffiles"
for script in postinst prerm postrm; do
    install -m 0755 "$here/debian/$script" "$stage/DEBIAN/$script"
done
size=$(du -sk --exclude=DEBIAN "$stage" | cut -f1)
# The glibc the wheels need, as dpkg-shlibdeps would find it: each wheel runs
# on the oldest glibc its manylinux tags name (manylinux2014 is 2.17), and
# the package needs the newest of those.
glibc=$("$python" - "$out/wheels" <<'EOF'
import pathlib, re, sys
need = [17]
for wheel in pathlib.Path(sys.argv[1]).glob("*.whl"):
    tags = re.findall(r"manylinux_2_(\d+)_|manylinux(2014)_", wheel.name)
    if tags:
        need.append(min(17 if old else int(new) for new, old in tags))
print(max(need))
EOF
)
sed -e "s|@VERSION@|$version-$revision|" -e "s|@ARCH@|$arch|" -e "s|@PYTHON@|$pyname|" \
    -e "s|@LIBC@|libc6 (>= 2.$glibc)|" \
    -e "s|@SIZE@|$size|" \
    -e "s|@MAINTAINER@|${DEBFULLNAME:-tokenlife maintainers} <${DEBEMAIL:-root@localhost}>|" \
    "$here/debian/control.in" >"$stage/DEBIAN/control"

deb=$out/tokenlife_$version-${revision}_$arch.deb
say "$(basename "$deb")"
# xz -1: a fifth of the time of the default level, a few percent larger.
dpkg-deb --root-owner-group -Zxz -z1 --build "$stage" "$deb" >/dev/null
printf '%s\n%s\n' "$out/$wheel" "$deb"
