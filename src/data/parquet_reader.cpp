#include "data/parquet_reader.h"

#include <algorithm>
#include <cstdio>
#include <cstring>

#include "core/error.h"
#include "data/parquet_codecs.h"

namespace moeforge::data::parquet {

namespace {

constexpr int kMaxSchemaDepth = 64;
// Values (levels) one page may hold: far above what writers put in a page (pyarrow: 1 MiB or
// 20,000 rows), low enough that a hostile page cannot make the reader allocate without end.
constexpr int64_t kMaxPageValues = int64_t{1} << 22;
constexpr int64_t kMaxPageBytes = int64_t{1} << 30;

// How much larger than its compressed bytes a page can honestly be, per codec (each format's
// maximum expansion with room to spare); a header claiming more is malformed.
int64_t max_expansion(Codec c) {
  switch (c) {
    case Codec::Uncompressed: return 1;
    case Codec::Snappy: return 32;
    case Codec::Lz4Raw: return 256;
    case Codec::Gzip: return 1040;
    default: return 32768;
  }
}

bool is_list(const SchemaElement& e) {
  return e.converted_type == kList || e.logical_type == kLogicalList;
}
bool is_map(const SchemaElement& e) {
  return e.converted_type == kMap || e.converted_type == kMapKeyValue || e.logical_type == kLogicalMap;
}
bool repeated(const SchemaElement& e) { return e.repetition == Repetition::Repeated; }

std::string column_name(const std::vector<std::string>& path) {
  std::string s;
  for (const auto& p : path) s += (s.empty() ? "" : ".") + p;
  return s;
}

// One column chunk's levels and (non-null) values.
struct LeafData {
  std::vector<int16_t> rep, def;
  std::vector<Json> values;
  std::vector<uint32_t> value_at;  // per level entry: its value's index (where def is the maximum)
};

}  // namespace

ParquetFile ParquetFile::open(const std::string& path) {
  ParquetFile f;
  f.file_ = FileBytes::open(path);
  f.read_footer();
  return f;
}

ParquetFile ParquetFile::from_bytes(std::string bytes, const std::string& name) {
  ParquetFile f;
  f.file_ = FileBytes::from_bytes(std::move(bytes), name);
  f.read_footer();
  return f;
}

void ParquetFile::read_footer() {
  // "PAR1", the data, the footer, the footer's length (4 bytes, little-endian), "PAR1".
  MF_CHECK(file_.size() >= 12, file_.name(), ": not a Parquet file (", file_.size(), " bytes)");
  const auto head = file_.read_at(0, 4, "its magic"), tail = file_.read_at(file_.size() - 8, 8, "its footer's length");
  MF_CHECK(std::memcmp(head.data(), "PAR1", 4) == 0 && std::memcmp(tail.data() + 4, "PAR1", 4) == 0, file_.name(),
           ": not a Parquet file (no PAR1 magic at its start and end", std::memcmp(tail.data() + 4, "PARE", 4) == 0
               ? "; PARE: its footer is encrypted, which moeforge does not read)" : ")");
  const auto len = read_le<uint32_t>(tail.data());
  MF_CHECK(len <= file_.size() - 12, file_.name(), ": its footer length ", len, " is larger than the file");
  const auto footer = file_.read_at(file_.size() - 8 - len, len, "its footer");
  ThriftReader r(footer.data(), footer.size(), file_.name() + ": footer");
  meta_ = read_file_metadata(r);
  build_schema();
}

void ParquetFile::build_schema() {
  const auto& s = meta_.schema;
  MF_CHECK(!s.empty() && s[0].num_children > 0, file_.name(), ": its schema has no columns");
  nodes_.resize(s.size());
  size_t next = 1;
  int leaves = 0;
  std::vector<int> path;
  // Depth-first: each element is followed by its num_children subtrees.
  std::function<void(int, int)> build = [&](int index, int depth) {
    MF_CHECK(depth <= kMaxSchemaDepth, file_.name(), ": its schema nests deeper than ", kMaxSchemaDepth);
    Node& n = nodes_[index];
    n.element = &s[index];
    const SchemaElement& e = s[index];
    if (index > 0) {
      MF_CHECK(e.repetition, file_.name(), ": schema element '", e.name, "' has no repetition type");
      const Node& parent = nodes_[path.back()];
      n.def_level = parent.def_level + (*e.repetition != Repetition::Required);
      n.rep_level = parent.rep_level + (*e.repetition == Repetition::Repeated);
    }
    MF_CHECK(e.num_children >= 0 && static_cast<size_t>(e.num_children) <= s.size() - next, file_.name(),
             ": schema element '", e.name, "' claims ", e.num_children, " children, more than the schema holds");
    if (e.num_children == 0) {
      MF_CHECK(index > 0 && e.type, file_.name(), ": schema element '", e.name, "' is neither a group nor a typed column");
      n.leaf = leaves++;
      leaf_paths_.push_back(std::vector<int>(path.begin() + 1, path.end()));
      leaf_paths_.back().push_back(index);
      return;
    }
    path.push_back(index);
    for (int c = 0; c < e.num_children; ++c) {
      // The subtrees before this child may have used up the elements its count promised.
      MF_CHECK(next < s.size(), file_.name(), ": schema element '", e.name, "' claims ", e.num_children,
               " children, more than the schema holds");
      const int child = static_cast<int>(next++);
      n.children.push_back(child);
      build(child, depth + 1);
    }
    path.pop_back();
  };
  build(0, 0);
  MF_CHECK(next == s.size(), file_.name(), ": its schema has ", s.size() - next, " elements outside the tree");
  for (size_t g = 0; g < meta_.row_groups.size(); ++g)
    MF_CHECK(meta_.row_groups[g].columns.size() == static_cast<size_t>(leaves), file_.name(), ": row group ", g, " has ",
             meta_.row_groups[g].columns.size(), " columns, the schema ", leaves);
}

std::vector<std::string> ParquetFile::top_level_fields() const {
  std::vector<std::string> out;
  for (const int c : nodes_[0].children) out.push_back(nodes_[c].element->name);
  return out;
}

namespace {

struct ColumnReader {
  const std::string& file;
  const std::vector<ParquetFile::Node>& nodes;
  const std::vector<int>& path;  // node indices, top-level field first

  // The column's path of names, as the chunk metadata spells it.
  std::vector<std::string> names() const {
    std::vector<std::string> out;
    for (const int i : path) out.push_back(nodes[i].element->name);
    return out;
  }

  std::string where(size_t group) const {
    return file + ": column '" + column_name(names()) + "', row group " + std::to_string(group);
  }

  // Levels of one page: v1 prefixes each run with its byte length; v2 gives the lengths in its header.
  void levels(Bytes& in, int max_level, size_t count, bool length_prefixed, std::vector<int16_t>& out,
              const std::string& what) const {
    if (max_level == 0) {
      out.insert(out.end(), count, 0);
      return;
    }
    Bytes run = in;
    if (length_prefixed) {
      MF_CHECK(in.left() >= 4, what, ": ends inside its levels' length");
      const auto n = read_le<uint32_t>(in.p);
      MF_CHECK(n <= in.left() - 4, what, ": its levels run past the page");
      run = Bytes{in.p + 4, in.p + 4 + n};
      in.p += 4 + n;
    }
    std::vector<uint32_t> v;
    v.reserve(count);
    decode_hybrid(run, bit_width_of(max_level), count, v, what);
    for (const uint32_t x : v) {
      MF_CHECK(x <= static_cast<uint32_t>(max_level), what, ": a level of ", x, " above the column's maximum ", max_level);
      out.push_back(static_cast<int16_t>(x));
    }
  }

  LeafData read(const std::vector<uint8_t>& chunk, const ColumnMeta& meta, size_t group) const {
    const std::string what = where(group);
    const ParquetFile::Node& leaf = nodes[path.back()];
    const SchemaElement& e = *leaf.element;
    const int max_def = leaf.def_level, max_rep = leaf.rep_level;
    const LeafType type{*e.type, e.type_length,
                        e.converted_type && *e.converted_type >= kUint8 && *e.converted_type <= kUint64};
    LeafData d;
    std::vector<Json> dictionary;
    bool have_dictionary = false;
    size_t pos = 0;
    int64_t levels_read = 0;
    while (levels_read < meta.num_values && pos < chunk.size()) {
      ThriftReader r(chunk.data() + pos, chunk.size() - pos, what + ": page header");
      const PageHeader h = read_page_header(r);
      pos += r.position();
      MF_CHECK(h.compressed_page_size >= 0 && static_cast<size_t>(h.compressed_page_size) <= chunk.size() - pos, what,
               ": a page of ", h.compressed_page_size, " bytes runs past its column chunk");
      MF_CHECK(h.uncompressed_page_size >= 0 && h.uncompressed_page_size <= kMaxPageBytes, what,
               ": a page of ", h.uncompressed_page_size, " uncompressed bytes");
      const uint8_t* page = chunk.data() + pos;
      const auto page_size = static_cast<size_t>(h.compressed_page_size);
      pos += page_size;
      const auto inflate = [&](const uint8_t* p, size_t n, int64_t out_size) {
        MF_CHECK(out_size >= 0 && out_size <= 65536 + static_cast<int64_t>(n) * max_expansion(meta.codec), what,
                 ": a page header claims ", out_size, " bytes from ", n, " ", codec_name(meta.codec), " bytes");
        return decompress(meta.codec, p, n, static_cast<size_t>(out_size), what);
      };
      if (h.type == PageType::Dictionary) {
        MF_CHECK(h.dictionary && !have_dictionary, what, h.dictionary ? ": a second dictionary page" : ": a dictionary page without its header");
        MF_CHECK(h.dictionary->num_values >= 0 && h.dictionary->num_values <= kMaxPageValues, what,
                 ": a dictionary of ", h.dictionary->num_values, " values");
        const auto bytes = inflate(page, page_size, h.uncompressed_page_size);
        Bytes in{bytes.data(), bytes.data() + bytes.size()};
        decode_values(Encoding::Plain, type, in, static_cast<size_t>(h.dictionary->num_values), dictionary, what);
        have_dictionary = true;
        continue;
      }
      if (h.type != PageType::Data && h.type != PageType::DataV2) continue;  // index pages
      const bool v2 = h.type == PageType::DataV2;
      MF_CHECK(v2 ? bool(h.data_v2) : bool(h.data), what, ": a data page without its header");
      const int64_t n = v2 ? h.data_v2->num_values : h.data->num_values;
      const Encoding encoding = v2 ? h.data_v2->encoding : h.data->encoding;
      MF_CHECK(n >= 0 && n <= kMaxPageValues && n <= meta.num_values - levels_read, what, ": a page of ", n,
               " values (", meta.num_values - levels_read, " of the column chunk's are left)");
      std::vector<uint8_t> bytes;
      Bytes in{};
      const size_t first = d.def.size();
      if (v2) {
        const int64_t rl = h.data_v2->repetition_levels_byte_length, dl = h.data_v2->definition_levels_byte_length;
        MF_CHECK(rl >= 0 && dl >= 0 && rl + dl <= static_cast<int64_t>(page_size) && rl + dl <= h.uncompressed_page_size,
                 what, ": a v2 page's level lengths exceed the page");
        Bytes reps{page, page + rl}, defs{page + rl, page + rl + dl};
        levels(reps, max_rep, static_cast<size_t>(n), false, d.rep, what);
        levels(defs, max_def, static_cast<size_t>(n), false, d.def, what);
        const uint8_t* values = page + rl + dl;
        const size_t values_size = page_size - static_cast<size_t>(rl + dl);
        const int64_t values_out = h.uncompressed_page_size - rl - dl;
        bytes = h.data_v2->is_compressed ? inflate(values, values_size, values_out)
                                         : decompress(Codec::Uncompressed, values, values_size, static_cast<size_t>(values_out), what);
        in = Bytes{bytes.data(), bytes.data() + bytes.size()};
      } else {
        bytes = inflate(page, page_size, h.uncompressed_page_size);
        in = Bytes{bytes.data(), bytes.data() + bytes.size()};
        for (const Encoding le : {h.data->repetition_level_encoding, h.data->definition_level_encoding})
          MF_CHECK(le == Encoding::Rle, what, ": levels encoded as ", encoding_name(le), ", which moeforge does not read");
        levels(in, max_rep, static_cast<size_t>(n), true, d.rep, what);
        levels(in, max_def, static_cast<size_t>(n), true, d.def, what);
      }
      size_t present = 0;
      for (size_t i = first; i < d.def.size(); ++i) present += d.def[i] == max_def;
      if (encoding == Encoding::PlainDictionary || encoding == Encoding::RleDictionary) {
        MF_CHECK(have_dictionary, what, ": dictionary-encoded values without a dictionary page");
        MF_CHECK(in.left() >= 1 || present == 0, what, ": ends before its dictionary indices");
        const int width = present ? *in.p++ : 0;
        std::vector<uint32_t> idx;
        idx.reserve(present);
        decode_hybrid(in, width, present, idx, what);
        for (const uint32_t i : idx) {
          MF_CHECK(i < dictionary.size(), what, ": dictionary index ", i, " of a dictionary of ", dictionary.size());
          d.values.push_back(dictionary[i]);
        }
      } else {
        decode_values(encoding, type, in, present, d.values, what);
      }
      levels_read += n;
    }
    MF_CHECK(levels_read == meta.num_values, what, ": holds ", levels_read, " values, its metadata says ", meta.num_values);
    d.value_at.resize(d.def.size());
    uint32_t v = 0;
    for (size_t i = 0; i < d.def.size(); ++i) {
      d.value_at[i] = v;
      v += d.def[i] == max_def;
    }
    return d;
  }
};

// Builds one record's value of a column's path from its level entries [a, b) (Dremel's
// assembly): a repeated node is a list of its instances (split where the repetition level comes
// back to it), a node whose definition level was not reached is null (or an empty list), a group
// is an object holding the one child on this column's path. Other columns under the same groups
// fill in the other children (merge below).
struct Assembler {
  const std::vector<ParquetFile::Node>& nodes;
  const std::vector<int>& path;
  const LeafData& d;
  const std::string& what;

  void single(size_t a, size_t b) const {
    MF_CHECK(b - a == 1, what, ": inconsistent repetition and definition levels");
  }

  Json instance(size_t k, size_t a, size_t b) const {  // node path[k], defined
    if (k + 1 == path.size()) {
      single(a, b);
      MF_CHECK(d.value_at[a] < d.values.size(), what, ": fewer values than its definition levels promise");
      return d.values[d.value_at[a]];
    }
    Json o = Json::object();
    o[nodes[path[k + 1]].element->name] = child(k + 1, a, b);
    return o;
  }

  Json child(size_t k, size_t a, size_t b) const {  // node path[k] within its defined parent
    const ParquetFile::Node& n = nodes[path[k]];
    if (d.def[a] < n.def_level) {
      single(a, b);
      return repeated(*n.element) ? Json::array() : Json();
    }
    if (!repeated(*n.element)) return instance(k, a, b);
    Json list = Json::array();
    size_t s = a;
    for (size_t t = a + 1; t <= b; ++t)
      if (t == b || d.rep[t] <= n.rep_level) {
        // Every instance after the first begins where the repetition level comes back to n, so n
        // is defined there; a file whose definition level says otherwise is malformed (found by
        // fuzz_parquet: a leaf entry counted as a value that no value backs).
        MF_CHECK(d.def[s] >= n.def_level, what, ": inconsistent repetition and definition levels");
        list.push_back(instance(k, s, t));
        s = t;
      }
    return list;
  }
};

void merge(Json& into, Json&& from, const std::string& what) {
  if (into.is_object() && from.is_object()) {
    for (auto& [key, value] : from.items()) {
      if (into.contains(key)) merge(into[key], std::move(value), what);
      else into[key] = std::move(value);
    }
    return;
  }
  if (into.is_array() && from.is_array()) {
    MF_CHECK(into.size() == from.size(), what, ": columns of one list disagree on its length");
    for (size_t i = 0; i < into.size(); ++i) merge(into[i], std::move(from[i]), what);
    return;
  }
  MF_CHECK(into.is_null() && from.is_null(), what, ": columns of one group disagree on where it is null");
}

// The assembled value in the shape a JSON reader expects: a LIST group is a list of its elements
// (three-level <list> / element, or two-level where the repeated node is the element), a MAP a
// list of [key, value] pairs (as pyarrow reads it), other groups objects.
Json shape(const std::vector<ParquetFile::Node>& nodes, int index, Json raw, bool as_instance);

Json shape_children(const std::vector<ParquetFile::Node>& nodes, const ParquetFile::Node& n, Json raw) {
  const SchemaElement& e = *n.element;
  if (raw.is_null() || n.children.empty()) return raw;
  if ((is_list(e) || is_map(e)) && n.children.size() == 1 && repeated(*nodes[n.children[0]].element)) {
    const ParquetFile::Node& r = nodes[n.children[0]];
    Json elements = raw.contains(r.element->name) ? std::move(raw[r.element->name]) : Json::array();
    Json out = Json::array();
    if (is_map(e)) {  // [key, value] pairs, as pyarrow's to_pylist gives them
      for (auto& kv : elements) {
        Json pair = shape(nodes, n.children[0], std::move(kv), true);  // {key, value} by position
        Json entry = Json::array();
        if (pair.is_object())
          for (auto& [name, v] : pair.items()) entry.push_back(std::move(v));
        out.push_back(std::move(entry));
      }
      return out;
    }
    const std::string& rn = r.element->name;
    const bool three_level = r.children.size() == 1 && rn != "array" && rn != e.name + "_tuple";
    for (auto& el : elements) {
      if (three_level) {
        const int item = r.children[0];
        Json v = el.is_object() && el.contains(nodes[item].element->name) ? std::move(el[nodes[item].element->name]) : Json();
        out.push_back(shape(nodes, item, std::move(v), false));
      } else {
        out.push_back(shape(nodes, n.children[0], std::move(el), true));
      }
    }
    return out;
  }
  Json o = Json::object();
  for (const int c : n.children) {
    const std::string& name = nodes[c].element->name;
    if (raw.contains(name)) o[name] = shape(nodes, c, std::move(raw[name]), false);
  }
  return o;
}

Json shape(const std::vector<ParquetFile::Node>& nodes, int index, Json raw, bool as_instance) {
  const ParquetFile::Node& n = nodes[index];
  if (!as_instance && repeated(*n.element) && raw.is_array()) {
    for (auto& x : raw) x = shape_children(nodes, n, std::move(x));
    return raw;
  }
  return shape_children(nodes, n, std::move(raw));
}

}  // namespace

void ParquetFile::for_each_row(const std::vector<std::string>& fields, const std::function<void(int64_t, Json&&)>& fn) const {
  // The columns of each field asked for, by top-level field.
  std::vector<std::pair<int, std::vector<int>>> wanted;  // (top-level node, its columns)
  for (const int c : nodes_[0].children)
    if (std::find(fields.begin(), fields.end(), nodes_[c].element->name) != fields.end()) {
      std::vector<int> columns;
      for (size_t l = 0; l < leaf_paths_.size(); ++l)
        if (leaf_paths_[l].front() == c) columns.push_back(static_cast<int>(l));
      wanted.emplace_back(c, std::move(columns));
    }
  MF_CHECK(!wanted.empty(), file_.name(), ": has none of the columns ", [&] {
    std::string list;
    for (const auto& f : fields) list += (list.empty() ? "" : ", ") + f;
    return list;
  }());
  int64_t row = 0;
  for (size_t g = 0; g < meta_.row_groups.size(); ++g) {
    const RowGroup& group = meta_.row_groups[g];
    std::vector<Json> rows;
    for (const auto& [top, columns] : wanted) {
      std::vector<Json> values;
      for (const int l : columns) {
        const ColumnReader reader{file_.name(), nodes_, leaf_paths_[l]};
        const std::string what = reader.where(g);
        const ColumnChunk& chunk = group.columns[static_cast<size_t>(l)];
        MF_CHECK(!chunk.file_path, what, ": lives in another file (", chunk.file_path.value_or(""), "), which moeforge does not follow");
        MF_CHECK(chunk.meta, what, ": has no column metadata");
        const ColumnMeta& m = *chunk.meta;
        MF_CHECK(m.type == *nodes_[leaf_paths_[l].back()].element->type, what, ": its chunk's type differs from the schema's");
        const std::vector<std::string> names = reader.names();
        MF_CHECK(m.path == names, what, ": its chunk is for column '", column_name(m.path), "'");
        int64_t start = m.data_page_offset;
        if (m.dictionary_page_offset && *m.dictionary_page_offset > 0 && *m.dictionary_page_offset < start)
          start = *m.dictionary_page_offset;
        const auto bytes = file_.read_at(start, m.total_compressed_size, "column chunk '" + column_name(names) + "'");
        const LeafData d = reader.read(bytes, m, g);
        // Records start where the repetition level is 0.
        const auto records = static_cast<size_t>(std::count(d.rep.begin(), d.rep.end(), int16_t{0}));
        MF_CHECK(static_cast<int64_t>(records) == group.num_rows && (d.rep.empty() || d.rep[0] == 0), what, ": holds ",
                 records, " records, its row group ", group.num_rows, " rows");
        const bool first = l == columns.front();
        if (first) values.resize(records);
        const Assembler assemble{nodes_, leaf_paths_[l], d, what};
        size_t record = 0, a = 0;
        for (size_t t = 1; t <= d.rep.size(); ++t) {
          if (t < d.rep.size() && d.rep[t] != 0) continue;
          Json v = assemble.child(0, a, t);
          if (first) values[record] = std::move(v);
          else merge(values[record], std::move(v), what);
          ++record;
          a = t;
        }
      }
      if (rows.empty()) rows.assign(values.size(), Json::object());
      for (size_t r = 0; r < rows.size(); ++r) {
        Json v = shape(nodes_, top, std::move(values[r]), false);
        if (!v.is_null()) rows[r][nodes_[top].element->name] = std::move(v);
      }
    }
    for (auto& r : rows) fn(row++, std::move(r));
  }
}

}  // namespace moeforge::data::parquet
