#include "data/parquet_codecs.h"

#include <brotli/decode.h>
#include <zlib.h>
#include <zstd.h>

#include <algorithm>
#include <cstring>

#include "core/error.h"

namespace moeforge::data::parquet {

namespace {

// Copies `len` bytes from `offset` back in `out` (they may overlap the bytes being written: a
// run repeats its start, so byte by byte).
void copy_back(std::vector<uint8_t>& out, size_t& n, size_t offset, size_t len, size_t out_size, const std::string& what,
               const char* codec) {
  MF_CHECK(offset > 0 && offset <= n, what, ": malformed ", codec, " data (a copy from before the start)");
  MF_CHECK(len <= out_size - n, what, ": ", codec, " data decompresses past its declared size");
  for (size_t i = 0; i < len; ++i, ++n) out[n] = out[n - offset];
}

}  // namespace

// Snappy's format: the uncompressed length as a varint, then elements. An element's tag's low two
// bits say what it is: 0 a literal (length in the tag's upper six bits, or in 1-4 bytes after it
// when those say 60-63), 1 a copy of 4-11 bytes with an 11-bit offset, 2 and 3 copies of 1-64
// bytes with 2- and 4-byte offsets.
std::vector<uint8_t> snappy_decompress(const uint8_t* in, size_t in_size, size_t out_size, const std::string& what) {
  const char* codec = "SNAPPY";
  size_t p = 0;
  uint64_t declared = 0;
  for (int shift = 0;; shift += 7) {
    MF_CHECK(p < in_size && shift < 35, what, ": malformed SNAPPY data (its length)");
    declared |= static_cast<uint64_t>(in[p] & 0x7f) << shift;
    if (!(in[p++] & 0x80)) break;
  }
  MF_CHECK(declared == out_size, what, ": SNAPPY data holds ", declared, " bytes, the header says ", out_size);
  std::vector<uint8_t> out(out_size);
  size_t n = 0;
  const auto need = [&](size_t k) { MF_CHECK(k <= in_size - p, what, ": SNAPPY data ends early"); };
  while (p < in_size) {
    const uint8_t tag = in[p++];
    const int kind = tag & 3;
    if (kind == 0) {
      size_t len = tag >> 2;
      if (len >= 60) {
        const size_t bytes = len - 59;
        need(bytes);
        len = 0;
        for (size_t i = 0; i < bytes; ++i) len |= static_cast<size_t>(in[p + i]) << (8 * i);
        p += bytes;
      }
      ++len;
      need(len);
      MF_CHECK(len <= out_size - n, what, ": SNAPPY data decompresses past its declared size");
      std::memcpy(out.data() + n, in + p, len);
      p += len;
      n += len;
    } else if (kind == 1) {
      need(1);
      const size_t len = 4 + ((tag >> 2) & 7), offset = (static_cast<size_t>(tag >> 5) << 8) | in[p++];
      copy_back(out, n, offset, len, out_size, what, codec);
    } else {
      const size_t bytes = kind == 2 ? 2 : 4;
      need(bytes);
      size_t offset = 0;
      for (size_t i = 0; i < bytes; ++i) offset |= static_cast<size_t>(in[p + i]) << (8 * i);
      p += bytes;
      copy_back(out, n, offset, 1 + (tag >> 2), out_size, what, codec);
    }
  }
  MF_CHECK(n == out_size, what, ": SNAPPY data gives ", n, " bytes, the header says ", out_size);
  return out;
}

// LZ4's block format: sequences of a token (literal length in its high four bits, match length - 4
// in its low four; 15 means more length bytes follow, each added until one is below 255), the
// literals, a 2-byte offset and the match. The last sequence has literals only. Decodes one block
// into out[n..out_size); matches may reach back into what earlier blocks wrote (LZ4 frames).
void lz4_block_decode(const uint8_t* in, size_t in_size, std::vector<uint8_t>& out, size_t& n, size_t out_size,
                      const std::string& what) {
  const char* codec = "LZ4";
  size_t p = 0;
  const auto length = [&](size_t base) {
    size_t len = base;
    if (base == 15) {
      uint8_t b;
      do {
        MF_CHECK(p < in_size, what, ": LZ4 data ends early");
        b = in[p++];
        len += b;
        MF_CHECK(len <= out_size, what, ": LZ4 data decompresses past its declared size");
      } while (b == 255);
    }
    return len;
  };
  while (p < in_size) {
    const uint8_t token = in[p++];
    const size_t lit = length(token >> 4);
    MF_CHECK(lit <= in_size - p && lit <= out_size - n, what, ": malformed LZ4 data (a literal run too long)");
    if (lit > 0) std::memcpy(out.data() + n, in + p, lit);
    p += lit;
    n += lit;
    if (p == in_size) break;  // the last sequence
    MF_CHECK(in_size - p >= 2, what, ": LZ4 data ends early");
    const size_t offset = in[p] | (static_cast<size_t>(in[p + 1]) << 8);
    p += 2;
    copy_back(out, n, offset, length(token & 15) + 4, out_size, what, codec);
  }
}

std::vector<uint8_t> lz4_block_decompress(const uint8_t* in, size_t in_size, size_t out_size, const std::string& what) {
  std::vector<uint8_t> out(out_size);
  size_t n = 0;
  lz4_block_decode(in, in_size, out, n, out_size, what);
  MF_CHECK(n == out_size, what, ": LZ4 data gives ", n, " bytes, the header says ", out_size);
  return out;
}

// Parquet's deprecated LZ4 codec, as files hold it: Hadoop's framing (parquet-mr, Spark: blocks of
// a big-endian decompressed size, a big-endian compressed size and an LZ4 block), or one bare LZ4
// block (older parquet-cpp). Like Arrow's reader, the framing is tried first and the bare block
// read when the sizes do not add up to it.
std::vector<uint8_t> lz4_hadoop_decompress(const uint8_t* in, size_t in_size, size_t out_size, const std::string& what) {
  const auto be32 = [&](size_t at) {
    return (static_cast<uint32_t>(in[at]) << 24) | (static_cast<uint32_t>(in[at + 1]) << 16) |
           (static_cast<uint32_t>(in[at + 2]) << 8) | static_cast<uint32_t>(in[at + 3]);
  };
  std::vector<uint8_t> out(out_size);
  size_t p = 0, n = 0;
  bool framed = in_size >= 8;
  while (framed && in_size - p >= 8) {
    const size_t raw = be32(p), packed = be32(p + 4);
    if (packed > in_size - p - 8 || raw > out_size - n) {
      framed = false;
      break;
    }
    const size_t before = n;
    try {
      lz4_block_decode(in + p + 8, packed, out, n, before + raw, what);
    } catch (const Error&) {
      framed = false;
      break;
    }
    framed = n - before == raw;
    p += 8 + packed;
  }
  if (framed && p == in_size && n == out_size) return out;
  return lz4_block_decompress(in, in_size, out_size, what);
}

// LZ4's frame format (Arrow's LZ4_FRAME buffers): a magic number, a descriptor (flags: version 01,
// block checksums, content size, content checksum, dictionary id; the block size byte; a header
// checksum byte), then blocks, each a 32-bit size (high bit: stored uncompressed) and its bytes
// (plus a 4-byte checksum when flagged), up to a zero size; then an optional 4-byte content
// checksum. Checksums are skipped, not verified (the sizes are).
std::vector<uint8_t> lz4_frame_decompress(const uint8_t* in, size_t in_size, size_t out_size, const std::string& what) {
  const auto u32 = [&](size_t at) {
    MF_CHECK(at <= in_size && in_size - at >= 4, what, ": LZ4 frame ends early");
    return static_cast<uint32_t>(in[at]) | (static_cast<uint32_t>(in[at + 1]) << 8) |
           (static_cast<uint32_t>(in[at + 2]) << 16) | (static_cast<uint32_t>(in[at + 3]) << 24);
  };
  MF_CHECK(u32(0) == 0x184D2204u, what, ": not an LZ4 frame (magic number)");
  MF_CHECK(in_size >= 7, what, ": LZ4 frame ends early");
  const uint8_t flags = in[4];
  MF_CHECK((flags >> 6) == 1, what, ": LZ4 frame of an unknown version");
  MF_CHECK(!(flags & 1), what, ": LZ4 frame with a dictionary (not read)");
  const bool block_checksums = flags & 0x10, content_size = flags & 0x08, content_checksum = flags & 0x04;
  size_t p = 6 + (content_size ? 8 : 0) + 1;  // magic, flags, block size byte, [content size], header checksum
  std::vector<uint8_t> out(out_size);
  size_t n = 0;
  for (;;) {
    const uint32_t word = u32(p);
    p += 4;
    if (word == 0) break;
    const size_t size = word & 0x7fffffffu;
    MF_CHECK(size <= in_size - p, what, ": an LZ4 frame block runs past the buffer");
    if (word & 0x80000000u) {
      MF_CHECK(size <= out_size - n, what, ": LZ4 data decompresses past its declared size");
      std::memcpy(out.data() + n, in + p, size);
      n += size;
    } else {
      lz4_block_decode(in + p, size, out, n, out_size, what);
    }
    p += size + (block_checksums ? 4 : 0);
    MF_CHECK(p <= in_size, what, ": LZ4 frame ends early");
  }
  MF_CHECK(p + (content_checksum ? 4 : 0) <= in_size, what, ": LZ4 frame ends early");
  MF_CHECK(n == out_size, what, ": LZ4 data gives ", n, " bytes, the header says ", out_size);
  return out;
}

namespace {

std::vector<uint8_t> gzip_decompress(const uint8_t* in, size_t in_size, size_t out_size, const std::string& what) {
  std::vector<uint8_t> out(out_size);
  z_stream z{};
  MF_CHECK(inflateInit2(&z, 15 + 32) == Z_OK, what, ": cannot start zlib");  // gzip or zlib header
  z.next_in = const_cast<Bytef*>(in);
  z.avail_in = static_cast<uInt>(std::min<size_t>(in_size, UINT32_MAX));
  z.next_out = out.data();
  z.avail_out = static_cast<uInt>(std::min<size_t>(out_size, UINT32_MAX));
  const int rc = inflate(&z, Z_FINISH);
  const size_t got = z.total_out;
  inflateEnd(&z);
  MF_CHECK(rc == Z_STREAM_END, what, ": malformed GZIP data (zlib: ", rc == Z_BUF_ERROR ? "longer than the header says"
                                                                      : (z.msg ? z.msg : "error"), ")");
  MF_CHECK(got == out_size, what, ": GZIP data gives ", got, " bytes, the header says ", out_size);
  return out;
}

std::vector<uint8_t> zstd_decompress(const uint8_t* in, size_t in_size, size_t out_size, const std::string& what) {
  std::vector<uint8_t> out(out_size);
  const size_t got = ZSTD_decompress(out.data(), out_size, in, in_size);
  MF_CHECK(!ZSTD_isError(got), what, ": malformed ZSTD data (", ZSTD_getErrorName(got), ")");
  MF_CHECK(got == out_size, what, ": ZSTD data gives ", got, " bytes, the header says ", out_size);
  return out;
}

// BROTLI (RFC 7932) through libbrotlidec, whose one-shot call takes the exact output size the
// page header declares: a stream that needs more is malformed here, as one that gives less.
std::vector<uint8_t> brotli_decompress(const uint8_t* in, size_t in_size, size_t out_size, const std::string& what) {
  std::vector<uint8_t> out(out_size);
  size_t got = out_size;
  const BrotliDecoderResult r = BrotliDecoderDecompress(in_size, in, &got, out.data());
  MF_CHECK(r == BROTLI_DECODER_RESULT_SUCCESS, what, ": malformed BROTLI data",
           r == BROTLI_DECODER_RESULT_NEEDS_MORE_OUTPUT ? " (it decompresses past its declared size)" : "");
  MF_CHECK(got == out_size, what, ": BROTLI data gives ", got, " bytes, the header says ", out_size);
  return out;
}

}  // namespace

std::vector<uint8_t> decompress(Codec codec, const uint8_t* in, size_t in_size, size_t out_size, const std::string& what) {
  switch (codec) {
    case Codec::Uncompressed:
      MF_CHECK(in_size == out_size, what, ": ", in_size, " uncompressed bytes, the header says ", out_size);
      return std::vector<uint8_t>(in, in + in_size);
    case Codec::Snappy: return snappy_decompress(in, in_size, out_size, what);
    case Codec::Gzip: return gzip_decompress(in, in_size, out_size, what);
    case Codec::Zstd: return zstd_decompress(in, in_size, out_size, what);
    case Codec::Lz4Raw: return lz4_block_decompress(in, in_size, out_size, what);
    case Codec::Brotli: return brotli_decompress(in, in_size, out_size, what);
    case Codec::Lz4: return lz4_hadoop_decompress(in, in_size, out_size, what);
    default:
      MF_THROW(what, ": compressed with ", codec_name(codec),
               ", which moeforge does not read (SNAPPY, GZIP, ZSTD, LZ4_RAW, LZ4, BROTLI and uncompressed are read); rewrite it, "
               "e.g. pyarrow.parquet.write_table(table, path, compression='zstd')");
  }
}

}  // namespace moeforge::data::parquet
