# shellcheck shell=bash
# shellcheck disable=SC2034,SC2154 # the caller sets cachedir and work, and reads the *_bin and *_why results
# bench/fetch-qemu.sh — fetches newer QEMUs than the machine's: the
# qemu-utils packages (qemu-storage-daemon, qemu-img, qemu-io) of Debian
# bookworm-backports (10.0) and trixie-backports (11), unpacked under
# $cachedir without touching the system's apt state or packages. Sourced
# by bench/run and tests/testdata/qemu-versions/make.sh, which set
# cachedir and work (a scratch directory) and define log.
#
# After fetch_qsd10, $cachedir/qemu-10.0/usr/bin/qemu-img is qemu-img
# 10.0; after fetch_qsd11, $cachedir/qemu-trixie-backports/run-qemu-img
# runs qemu-img 11 with the trixie libraries.

# debian_source: prints "URI KEYRING" of the machine's apt source for the
# Debian archive: the first enabled "deb" entry, in /etc/apt/sources.list,
# sources.list.d/*.list (one-line format) or sources.list.d/*.sources
# (deb822), whose suites include this release's codename and whose
# components include main. KEYRING is its signed-by file, or "-". Prints
# nothing if there is none: no mirror is ever named here.
debian_source() {
	local codename f
	# shellcheck disable=SC1091
	codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
	[[ -n $codename ]] || return 0
	{
		for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
			[[ -r $f ]] || continue
			awk -v want="$codename" '
			{ sub(/#.*/, "") }
			$1 == "deb" {
				i = 2; key = "-"
				if ($i ~ /^\[/) {
					for (; i <= NF; i++) {
						o = $i; gsub(/[][]/, "", o)
						if (o ~ /^signed-by=/) { sub(/^signed-by=/, "", o); key = o }
						if ($i ~ /\]$/) { i++; break }
					}
				}
				uri = $i; suite = $(i + 1); main = 0
				for (j = i + 2; j <= NF; j++) if ($j == "main") main = 1
				if (suite == want && main) print uri, key
			}' "$f"
		done
		for f in /etc/apt/sources.list.d/*.sources; do
			[[ -r $f ]] || continue
			awk -v want="$codename" '
			function flush(   n, i, s, ok, main, c) {
				if (types ~ /(^| )deb( |$)/ && enabled !~ /^(no|false)$/ && uris != "") {
					n = split(suites, s, " "); ok = 0
					for (i = 1; i <= n; i++) if (s[i] == want) ok = 1
					n = split(comps, c, " "); main = 0
					for (i = 1; i <= n; i++) if (c[i] == "main") main = 1
					split(uris, u, " ")
					if (ok && main) print u[1], (key ~ /^\// ? key : "-")
				}
				types = uris = suites = comps = enabled = key = ""
			}
			/^#/ { next }
			/^[ \t]*$/ { flush(); next }
			/^[ \t]/ { next }
			{
				name = tolower($0); sub(/:.*/, "", name)
				v = $0; sub(/^[^:]*:[ \t]*/, "", v); sub(/[ \t]+$/, "", v)
				if (name == "types") types = v
				else if (name == "uris") uris = v
				else if (name == "suites") suites = v
				else if (name == "components") comps = v
				else if (name == "enabled") enabled = tolower(v)
				else if (name == "signed-by") key = v
			}
			END { flush() }' "$f"
		done
	} | head -n1
}

# apt_fetch NAME SUITES WITH_DEPS PKG/SUITE ROOT: downloads PKG from SUITE
# (with every package it depends on, when WITH_DEPS is 1) through a
# private apt configuration and state in $cachedir/apt-NAME, using the
# machine's Debian mirror (debian_source) and never touching the system's
# apt state or packages, and unpacks the .debs into ROOT (replaced). On
# failure sets fetch_why.
fetch_why=""
apt_fetch() {
	local suites=$2 with_deps=$3 pkg=$4 root=$5 apt=$cachedir/apt-$1 src uri key s
	fetch_why=""
	src=$(debian_source)
	if [[ -z $src ]]; then
		fetch_why="no Debian archive in the machine's apt sources (/etc/apt/sources.list, /etc/apt/sources.list.d)"
		return 1
	fi
	read -r uri key <<<"$src"
	rm -rf "$apt"
	mkdir -p "$apt/lists/partial" "$apt/dl/partial" "$apt/none"
	: >"$apt/status"
	local opt=""
	[[ $key != - ]] && opt="[signed-by=$key] "
	for s in $suites; do
		echo "deb ${opt}$uri $s main"
	done >"$apt/sources.list"
	local o=(-o "Dir::Etc::SourceList=$apt/sources.list" -o "Dir::Etc::SourceParts=$apt/none"
		-o "Dir::Etc::Preferences=$apt/none/preferences" -o "Dir::Etc::PreferencesParts=$apt/none"
		-o "Dir::State::Lists=$apt/lists" -o "Dir::State::status=$apt/status"
		-o "Dir::Cache=$apt" -o "Dir::Cache::archives=$apt/dl" -o "APT::Sandbox::User=root")
	log "fetching $pkg from $uri ($suites)"
	if ! timeout 300 apt-get "${o[@]}" -qq update >"$work/apt.log" 2>&1; then
		fetch_why="apt-get update of $suites from $uri failed: $(tail -n1 "$work/apt.log")"
		return 1
	fi
	if ((with_deps)); then
		# The private dpkg status is empty, so this downloads the package
		# and its whole dependency closure, and installs nothing.
		if ! timeout 600 apt-get "${o[@]}" -qq -y --download-only --no-install-recommends install "$pkg" >"$work/apt.log" 2>&1; then
			fetch_why="apt-get --download-only install $pkg failed: $(tail -n1 "$work/apt.log")"
			return 1
		fi
	elif ! (cd "$apt/dl" && timeout 300 apt-get "${o[@]}" -qq download "$pkg") >"$work/apt.log" 2>&1; then
		fetch_why="apt-get download $pkg failed: $(tail -n1 "$work/apt.log")"
		return 1
	fi
	rm -rf "$root.new"
	local deb
	for deb in "$apt/dl/"*.deb; do
		dpkg -x "$deb" "$root.new" || { fetch_why="dpkg -x $deb failed"; return 1; }
	done
	rm -rf "$root" && mv "$root.new" "$root"
}

# fetch_qsd10: sets qsd10_bin to a qemu-storage-daemon 10.0 unpacked from
# Debian bookworm-backports (the qemu-utils package holds the daemon from
# QEMU 9 on) into $cachedir/qemu-10.0; it runs on the machine's bookworm
# libraries. On failure sets qsd10_why.
qsd10_bin="" qsd10_why=""
fetch_qsd10() {
	local root=$cachedir/qemu-10.0
	local bin=$root/usr/bin/qemu-storage-daemon
	if [[ -x $bin ]] && "$bin" --version 2>/dev/null | grep -q 'version 10\.'; then
		qsd10_bin=$bin
		return 0
	fi
	local codename
	# shellcheck disable=SC1091
	codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
	if [[ $codename != bookworm ]]; then
		qsd10_why="needs Debian bookworm for bookworm-backports (this is ${codename:-unknown})"
		return 1
	fi
	if ! apt_fetch bookworm-backports bookworm-backports 0 qemu-utils/bookworm-backports "$root"; then
		qsd10_why=$fetch_why
		return 1
	fi
	local missing
	missing=$(ldd "$bin" | awk '/not found/ {print $1}' | tr '\n' ' ')
	if [[ -n $missing ]]; then
		qsd10_why="libraries missing for the 10.0 daemon: $missing"
		return 1
	fi
	if ! "$bin" --version | grep -q 'version 10\.'; then
		qsd10_why="the bookworm-backports daemon is not 10.x: $("$bin" --version | head -n1)"
		return 1
	fi
	qsd10_bin=$bin
}

# fetch_qsd11: sets qsd11_bin to a qemu-storage-daemon 11 from Debian
# trixie-backports (qemu-utils) with the trixie libraries it links,
# unpacked together into $cachedir/qemu-trixie-backports, and started
# through that tree's own dynamic loader (a wrapper script,
# $root/run-qemu-storage-daemon), so it runs on a bookworm machine too.
# Takes the newest version the suite serves; the label is its real
# version. On failure sets qsd11_why.
qsd11_bin="" qsd11_why=""
fetch_qsd11() {
	local root=$cachedir/qemu-trixie-backports
	local bin=$root/run-qemu-storage-daemon
	if [[ -x $bin && -x $root/run-qemu-io ]] && "$bin" --version 2>/dev/null | grep -qE 'version (1[1-9]|[2-9][0-9])\.'; then
		qsd11_bin=$bin
		return 0
	fi
	if ! apt_fetch trixie-backports "trixie trixie-backports" 1 qemu-utils/trixie-backports "$root"; then
		qsd11_why=$fetch_why
		return 1
	fi
	local ldso libdir
	ldso=$(find "$root/usr/lib" -maxdepth 2 -name 'ld-linux*.so.*' | head -n1)
	if [[ -z $ldso ]]; then
		qsd11_why="no dynamic loader (libc6) among the trixie packages"
		return 1
	fi
	libdir=$(dirname "$ldso")
	# Paths relative to the wrapper, so that the cache can move. One
	# wrapper per program the package holds that is used: the daemon,
	# and qemu-img and qemu-io (tests/testdata/qemu-versions/make.sh).
	local prog
	for prog in qemu-storage-daemon qemu-img qemu-io; do
		cat >"$root/run-$prog" <<WRAPPER
#!/bin/sh
root=\$(dirname "\$(readlink -f "\$0")")
exec "\$root/${ldso#"$root"/}" --inhibit-cache --library-path "\$root/${libdir#"$root"/}" "\$root/usr/bin/$prog" "\$@"
WRAPPER
		chmod +x "$root/run-$prog"
	done
	# Every library must come from the unpacked tree, none from the host.
	local foreign
	foreign=$("$ldso" --inhibit-cache --library-path "$libdir" --list "$root/usr/bin/qemu-storage-daemon" 2>&1 |
		awk -v r="$root/" '/=>/ && index($3, r) != 1 {print $1}' | tr '\n' ' ')
	if [[ -n $foreign ]]; then
		qsd11_why="the trixie-backports daemon would load libraries from outside $root: $foreign"
		return 1
	fi
	if ! "$bin" --version 2>"$work/apt.log" | grep -qE 'version (1[1-9]|[2-9][0-9])\.'; then
		qsd11_why="the trixie-backports daemon is not 11 or newer: $("$bin" --version 2>&1 | head -n1)"
		return 1
	fi
	qsd11_bin=$bin
}
