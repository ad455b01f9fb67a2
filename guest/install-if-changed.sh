# Sourced by the guest's build scripts. Test binaries run them in parallel and key caches on
# their outputs: a file whose contents are unchanged is left alone (same inode and mtime), a
# changed one is replaced atomically.
install_if_changed() {
  cmp -s "$1" "$2" && return 0
  cp "$1" "$2.tmp.$$" && mv -f "$2.tmp.$$" "$2"
}
