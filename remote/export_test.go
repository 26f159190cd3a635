package remote

import "syscall"

var syscallEIO = syscall.EIO
