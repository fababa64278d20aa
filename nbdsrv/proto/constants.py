"""NBD protocol constants, named as in the spec (NetworkBlockDevice/nbd doc/proto.md).

Extended headers follow the spec's extension-ext-header text (QEMU >= 8.2, libnbd >= 1.18).
"""

from enum import IntEnum, IntFlag

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT": server greeting and every option request
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
EXTENDED_REQUEST_MAGIC = 0x21E41C71
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF
EXTENDED_REPLY_MAGIC = 0x6E8A278C

DEFAULT_PORT = 10809

# Section "Conventions": strings MUST be at most 4096 bytes.
MAX_STRING_LENGTH = 4096
# Largest READ we serve; the spec's interoperable maximum payload (2^25).
MAX_READ_LENGTH = 32 * 1024 * 1024
# QEMU's NBD_MAX_BLOCK_STATUS_EXTENTS (1 MiB of descriptors): at most this many a reply.
MAX_BLOCK_STATUS_EXTENTS = 131072
# Block sizes we advertise: any alignment, 4 KiB preferred, 32 MiB maximum payload.
MINIMUM_BLOCK_SIZE = 1
PREFERRED_BLOCK_SIZE = 4096
MAXIMUM_BLOCK_SIZE = MAX_READ_LENGTH


class HandshakeFlag(IntFlag):
    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlag(IntFlag):
    C_FIXED_NEWSTYLE = 1 << 0
    C_NO_ZEROES = 1 << 1


class Option(IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


NBD_REP_FLAG_ERROR = 1 << 31


class Reply(IntEnum):
    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = NBD_REP_FLAG_ERROR | 1
    ERR_POLICY = NBD_REP_FLAG_ERROR | 2
    ERR_INVALID = NBD_REP_FLAG_ERROR | 3
    ERR_PLATFORM = NBD_REP_FLAG_ERROR | 4
    ERR_TLS_REQD = NBD_REP_FLAG_ERROR | 5
    ERR_UNKNOWN = NBD_REP_FLAG_ERROR | 6
    ERR_SHUTDOWN = NBD_REP_FLAG_ERROR | 7
    ERR_BLOCK_SIZE_REQD = NBD_REP_FLAG_ERROR | 8
    ERR_TOO_BIG = NBD_REP_FLAG_ERROR | 9
    ERR_EXT_HEADER_REQD = NBD_REP_FLAG_ERROR | 10


class Info(IntEnum):
    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class TransmissionFlag(IntFlag):
    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11
    BLOCK_STATUS_PAYLOAD = 1 << 12


class Command(IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7
    RESIZE = 8


class CommandFlag(IntFlag):
    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4
    PAYLOAD_LEN = 1 << 5


class ReplyFlag(IntFlag):
    DONE = 1 << 0


class ReplyType(IntEnum):
    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    BLOCK_STATUS_EXT = 6
    ERROR = (1 << 15) | 1
    ERROR_OFFSET = (1 << 15) | 2


class Errno(IntEnum):
    """Error values on the wire (section "Error values")."""

    OK = 0
    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


class AllocationState(IntFlag):
    """base:allocation status flags."""

    DATA = 0
    HOLE = 1 << 0
    ZERO = 1 << 1


DIRTY = 1  # qemu:dirty-bitmap:* — bit 0 set when the extent is dirty

BASE_ALLOCATION = "base:allocation"
ALLOCATION_DEPTH = "qemu:allocation-depth"
DIRTY_BITMAP_PREFIX = "qemu:dirty-bitmap:"
