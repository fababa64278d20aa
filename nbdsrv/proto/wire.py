"""Struct layouts of NBD messages, with the wire diagrams from doc/proto.md. Big-endian."""

import struct

# Server greeting (newstyle):  NBDMAGIC(8) IHAVEOPT(8) handshake_flags(2)
GREETING = struct.Struct(">QQH")
# Client flags after the greeting:  client_flags(4)
CLIENT_FLAGS = struct.Struct(">I")
# Option request header:  IHAVEOPT(8) option(4) length(4)  then `length` bytes of data
OPTION_HEADER = struct.Struct(">QII")
# Option reply header:  0x3e889045565a9(8) option(4) reply_type(4) length(4)
OPTION_REPLY_HEADER = struct.Struct(">QIII")
# Reply to NBD_OPT_EXPORT_NAME:  export_size(8) transmission_flags(2) [124 zero bytes]
EXPORT_NAME_REPLY = struct.Struct(">QH")
EXPORT_NAME_PADDING = bytes(124)
# NBD_INFO_EXPORT payload:  info_type(2) export_size(8) transmission_flags(2)
INFO_EXPORT = struct.Struct(">HQH")
# NBD_INFO_BLOCK_SIZE payload:  info_type(2) minimum(4) preferred(4) maximum(4)
INFO_BLOCK_SIZE = struct.Struct(">HIII")
# A 16-bit info type, e.g. before NBD_INFO_NAME's name.
UINT16 = struct.Struct(">H")
UINT32 = struct.Struct(">I")
UINT64 = struct.Struct(">Q")

# Compact request:  magic(4) command_flags(2) type(2) cookie(8) offset(8) length(4)
REQUEST = struct.Struct(">IHHQQI")
# Extended request: magic(4) command_flags(2) type(2) cookie(8) offset(8) length(8)
EXTENDED_REQUEST = struct.Struct(">IHHQQQ")

# Simple reply:  magic(4) error(4) cookie(8)  [data for a successful READ]
SIMPLE_REPLY = struct.Struct(">IIQ")
# Structured reply chunk:  magic(4) flags(2) type(2) cookie(8) length(4)  payload
STRUCTURED_REPLY = struct.Struct(">IHHQI")
# Extended reply chunk:  magic(4) flags(2) type(2) cookie(8) offset(8) length(8)  payload
EXTENDED_REPLY = struct.Struct(">IHHQQQ")

# NBD_REPLY_TYPE_OFFSET_DATA payload prefix:  offset(8)  data
OFFSET_DATA = struct.Struct(">Q")
# An OFFSET_DATA chunk's header with its offset, in one pack (structured, compact headers).
DATA_CHUNK = struct.Struct(">IHHQIQ")
# NBD_REPLY_TYPE_OFFSET_HOLE payload:  offset(8) hole_size(4)
OFFSET_HOLE = struct.Struct(">QI")
# NBD_REPLY_TYPE_BLOCK_STATUS:  context_id(4) {length(4) status(4)}*
BLOCK_STATUS_HEADER = struct.Struct(">I")
EXTENT = struct.Struct(">II")
# NBD_REPLY_TYPE_BLOCK_STATUS_EXT:  context_id(4) count(4) {length(8) status(8)}*
BLOCK_STATUS_EXT_HEADER = struct.Struct(">II")
EXTENT_EXT = struct.Struct(">QQ")
# A block-status chunk's header with its payload's header, in one pack:
#   structured: magic(4) flags(2) type(2) cookie(8) length(4) context_id(4)
#   extended:   magic(4) flags(2) type(2) cookie(8) offset(8) length(8) context_id(4) count(4)
BLOCK_STATUS_CHUNK = struct.Struct(">IHHQII")
BLOCK_STATUS_EXT_CHUNK = struct.Struct(">IHHQQQII")
# ... and with its one descriptor (a REQ_ONE reply of one context): the whole reply.
BLOCK_STATUS_ONE = struct.Struct(">IHHQIIII")
BLOCK_STATUS_EXT_ONE = struct.Struct(">IHHQQQIIQQ")
# NBD_REPLY_TYPE_ERROR:  error(4) message_length(2) message
ERROR_CHUNK = struct.Struct(">IH")
# NBD_REPLY_TYPE_ERROR_OFFSET adds offset(8) after the message.
