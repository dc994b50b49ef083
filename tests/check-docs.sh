#!/bin/sh
# The headers' doc comments are the source of truth; docs/*.md must agree.
# For every function a public header declares with KEEL_API:
#   - its doc comment has a Context: line, and a Return: line unless the
#     function returns void;
#   - some docs/*.md has a "###" heading that names it;
#   - every error code (-EXXX) its doc comment lists appears in that
#     heading's section of the docs.
# Usage: check-docs.sh <source root>
set -eu
root=${1:?usage: check-docs.sh <source root>}
status=0

# One line per function: name<TAB>has_context<TAB>has_return<TAB>is_void<TAB>errors
list_functions() {
	awk '
	/\/\*\*/ { incomment = 1; doc = ""; }
	incomment { doc = doc " " $0; if ($0 ~ /\*\//) { incomment = 0; pending = 1; } next }
	pending && /KEEL_API/ { decl = $0; indecl = 1 }
	indecl && !/KEEL_API/ { decl = decl " " $0 }
	indecl && /;/ {
		indecl = 0; pending = 0
		if (match(decl, /keel_[a-z0-9_]+[ \t]*\(/)) {
			name = substr(decl, RSTART, RLENGTH)
			sub(/[ \t]*\($/, "", name)
			isvoid = (decl ~ /KEEL_API[ \t]+void[ \t]/) ? 1 : 0
			ctx = (doc ~ /Context:/) ? 1 : 0
			ret = (doc ~ /Return:/) ? 1 : 0
			errs = ""
			d = doc
			while (match(d, /-E[A-Z]+/)) {
				errs = errs " " substr(d, RSTART + 1, RLENGTH - 1)
				d = substr(d, RSTART + RLENGTH)
			}
			printf "%s\t%d\t%d\t%d\t%s\n", name, ctx, ret, isvoid, errs
		}
	}
	' "$@"
}

# The section of the docs whose ### heading names function $1.
doc_section() {
	awk -v fn="$1" '
	/^```/ { incode = !incode }
	!incode && /^#+ / {
		insec = 0
		if ($0 ~ /^### / && index($0, "`" fn "`") > 0)
			insec = 1
		else if ($0 ~ /^### / && (index($0, "`" fn ",") > 0 || index($0, " " fn "`") > 0))
			insec = 1
	}
	insec { print }
	' "$root"/docs/*.md
}

tab=$(printf '\t')
list_functions "$root"/include/keel/*.h >"${TMPDIR:-/tmp}/keel-docs.$$"
count=0
while IFS="$tab" read -r name ctx ret isvoid errs; do
	count=$((count + 1))
	if [ "$ctx" != 1 ]; then
		echo "$name: doc comment has no Context: line"
		status=1
	fi
	if [ "$isvoid" != 1 ] && [ "$ret" != 1 ]; then
		echo "$name: doc comment has no Return: line"
		status=1
	fi
	section=$(doc_section "$name")
	if [ -z "$section" ]; then
		echo "$name: no ### section in docs/*.md names it"
		status=1
		continue
	fi
	for e in $errs; do
		case "$section" in
		*"$e"*) ;;
		*)
			echo "$name: the header lists -$e; its docs section does not"
			status=1
			;;
		esac
	done
done <"${TMPDIR:-/tmp}/keel-docs.$$"
rm -f "${TMPDIR:-/tmp}/keel-docs.$$"
if [ "$count" -lt 10 ]; then
	echo "found only $count public functions: the parser is broken"
	status=1
fi
[ "$status" = 0 ] && echo "docs agree with the headers for $count functions"
exit $status
