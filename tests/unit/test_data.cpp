// Tests for the data pipeline: distilx/data/shards.hpp (llm.c shard format, header
// validation), corpus.hpp (documents, EOS placement, thread-count independence, JSON-lines
// and UTF-8 errors) and loader.hpp (window coverage, splits, shuffling, ranks, resume).
#include <boost/test/unit_test.hpp>

#include "test_util.hpp"

#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <set>
#include <string>
#include <vector>

#include "distilx/data/corpus.hpp"
#include "distilx/data/loader.hpp"
#include "distilx/data/shards.hpp"

namespace fs = std::filesystem;
using namespace distilx;
using namespace distilx::data;
using Ids = std::vector<std::int32_t>;

namespace {

/// TempDir with this suite's prefix (the helpers live in test_util.hpp).
struct TempDir : test_util::TempDir {
  TempDir() : test_util::TempDir("distilx_data") {}
};
using test_util::slurp;
using test_util::spit;

using distilx::test_util::check_throws;

/// Every byte is its own token; EOS is 256.
Ids byte_tokens(std::string_view s) {
  Ids v;
  for (unsigned char c : s) v.push_back(c);
  return v;
}
constexpr std::int32_t kEos = 256;

CorpusOptions byte_options(const std::string& prefix) {
  CorpusOptions o;
  o.output_prefix = prefix;
  o.eos_id = kEos;
  o.vocab_size = 257;
  return o;
}

/// All tokens of a list of shards, concatenated.
Ids read_all(const std::vector<std::string>& paths) {
  Ids all;
  for (const auto& p : paths) {
    ShardReader r(p);
    Ids t(static_cast<std::size_t>(r.size()));
    r.read(0, r.size(), t.data());
    all.insert(all.end(), t.begin(), t.end());
  }
  return all;
}

Ids concat_docs(std::initializer_list<std::string> docs) {
  Ids out;
  for (const auto& d : docs) {
    const Ids t = byte_tokens(d);
    out.insert(out.end(), t.begin(), t.end());
    out.push_back(kEos);
  }
  return out;
}

/// Shards whose token i is i (so a window's tokens name its position), split unevenly.
std::vector<std::string> counting_shards(const TempDir& td, const std::vector<index_t>& sizes) {
  std::vector<std::string> paths;
  std::int32_t next = 0;
  for (std::size_t s = 0; s < sizes.size(); ++s) {
    Ids t;
    for (index_t i = 0; i < sizes[s]; ++i) t.push_back(next++);
    paths.push_back(td.file("c_" + std::to_string(s) + ".bin"));
    write_shard(paths.back(), t);
  }
  return paths;
}

/// Collects one epoch of batches (until next() returns false), rows flattened.
std::vector<Ids> epoch_batches(TokenLoader& l, Ids* targets_out = nullptr) {
  const auto n = static_cast<std::size_t>(l.options().batch_size * l.options().seq_len);
  std::vector<Ids> out;
  Ids in(n), tg(n);
  while (l.next(in.data(), tg.data())) {
    out.push_back(in);
    if (targets_out) targets_out->insert(targets_out->end(), tg.begin(), tg.end());
  }
  return out;
}

// GPT-2's byte-to-character table of byte-level BPE, as UTF-8 strings.
std::string byte_level_char(int b) {
  int cp = b;
  auto printable = [](int x) { return (x >= 33 && x <= 126) || (x >= 161 && x <= 172) || (x >= 174 && x <= 255); };
  if (!printable(b)) {
    int n = 0;
    for (int x = 0; x < b; ++x)
      if (!printable(x)) ++n;
    cp = 256 + n;
  }
  std::string s;
  if (cp < 0x80) s += static_cast<char>(cp);
  else {
    s += static_cast<char>(0xC0 | (cp >> 6));
    s += static_cast<char>(0x80 | (cp & 0x3F));
  }
  return s;
}

}  // namespace

BOOST_AUTO_TEST_SUITE(data)

BOOST_AUTO_TEST_CASE(shard_round_trip_u32_and_u16) {
  TempDir td;
  const Ids toks{0, 1, 151'935, 65'535, 65'536, 2'000'000'000, 7};
  const std::string p32 = td.file("a.bin");
  write_shard(p32, toks);
  BOOST_CHECK_EQUAL(td.entries(), 1u);  // no temporary file left behind
  const std::string bytes = slurp(p32);
  BOOST_REQUIRE_EQUAL(bytes.size(), 1024 + 4 * toks.size());
  // Header: magic 20240801 (0x0134D2E1), version 7, count, little-endian; rest zero.
  BOOST_CHECK_EQUAL(distilx::data::detail::load_u32le(reinterpret_cast<const unsigned char*>(bytes.data())), 20240801u);
  BOOST_CHECK_EQUAL(distilx::data::detail::load_u32le(reinterpret_cast<const unsigned char*>(bytes.data()) + 4), 7u);
  BOOST_CHECK_EQUAL(distilx::data::detail::load_u32le(reinterpret_cast<const unsigned char*>(bytes.data()) + 8), toks.size());
  BOOST_CHECK(std::all_of(bytes.begin() + 12, bytes.begin() + 1024, [](char c) { return c == 0; }));

  ShardReader r(p32);
  BOOST_CHECK(r.format() == ShardFormat::u32);
  BOOST_REQUIRE_EQUAL(r.size(), static_cast<index_t>(toks.size()));
  Ids back(toks.size());
  r.read(0, r.size(), back.data());
  BOOST_CHECK(back == toks);
  Ids mid(3);
  r.read(2, 3, mid.data());
  BOOST_CHECK(mid == (Ids{151'935, 65'535, 65'536}));

  const Ids small{0, 65'535, 42};
  const std::string p16 = td.file("b.bin");
  write_shard(p16, small, ShardFormat::u16);
  BOOST_CHECK_EQUAL(fs::file_size(p16), 1024u + 2 * small.size());
  ShardReader r16(p16);
  BOOST_CHECK(r16.format() == ShardFormat::u16);
  Ids back16(small.size());
  r16.read(0, r16.size(), back16.data());
  BOOST_CHECK(back16 == small);

  // Empty shards are valid files.
  write_shard(td.file("e.bin"), Ids{});
  BOOST_CHECK_EQUAL(ShardReader(td.file("e.bin")).size(), 0);

  // Streaming writer in pieces equals one-shot write; moved readers keep their mapping.
  {
    ShardWriter w(td.file("s.bin"));
    w.append(toks.data(), 3);
    w.append(toks.data() + 3, toks.size() - 3);
    w.finish();
  }
  BOOST_CHECK(slurp(td.file("s.bin")) == bytes);
  ShardReader moved = std::move(r);
  BOOST_CHECK_EQUAL(moved.raw(2), 151'935u);
}

BOOST_AUTO_TEST_CASE(shard_writer_rejects_and_cleans_up) {
  TempDir td;
  check_throws<io_error>([&] { write_shard(td.file("x.bin"), Ids{1, 70'000}, ShardFormat::u16); },
                         {"x.bin", "70000", "offset 1", "uint16"});
  check_throws<io_error>([&] { write_shard(td.file("y.bin"), Ids{1, -3}); }, {"y.bin", "-3"});
  {
    ShardWriter w(td.file("z.bin"));
    w.append(Ids{1, 2, 3});
  }  // destroyed unfinished: abandoned
  BOOST_CHECK_EQUAL(td.entries(), 0u);
}

BOOST_AUTO_TEST_CASE(shard_header_validation) {
  TempDir td;
  const std::string good = td.file("good.bin");
  write_shard(good, Ids{1, 2, 3, 4});
  const std::string bytes = slurp(good);

  std::string bad_magic = bytes;
  bad_magic[0] = 0x11;
  spit(td.file("magic.bin"), bad_magic);
  check_throws<io_error>([&] { ShardReader r(td.file("magic.bin")); }, {"magic.bin", "bad magic", "20240801", "20240520"});

  std::string bad_version = bytes;
  bad_version[4] = 1;
  spit(td.file("version.bin"), bad_version);
  check_throws<io_error>([&] { ShardReader r(td.file("version.bin")); }, {"version.bin", "unsupported version 1", "expected 7"});

  spit(td.file("trunc.bin"), bytes.substr(0, bytes.size() - 3));
  check_throws<io_error>([&] { ShardReader r(td.file("trunc.bin")); },
                         {"trunc.bin", "4 uint32 tokens", "1040 bytes", "1037 bytes", "truncated"});

  spit(td.file("trail.bin"), bytes + "xx");
  check_throws<io_error>([&] { ShardReader r(td.file("trail.bin")); }, {"trail.bin", "1042 bytes", "trailing data"});

  spit(td.file("short.bin"), bytes.substr(0, 100));
  check_throws<io_error>([&] { ShardReader r(td.file("short.bin")); }, {"short.bin", "100 bytes", "1024-byte header"});

  check_throws<io_error>([&] { ShardReader r(td.file("missing.bin")); }, {"missing.bin", "cannot open"});
}

BOOST_AUTO_TEST_CASE(out_of_range_token_detected) {
  TempDir td;
  write_shard(td.file("v0.bin"), Ids{1, 2, 3, 4, 5, 6});
  write_shard(td.file("v1.bin"), Ids{1, 2, 499, 500, 5, 6});
  ShardReader r(td.file("v1.bin"));
  Ids buf(6);
  r.read(0, 3, buf.data(), 500);  // 499 is fine
  check_throws<io_error>([&] { r.read(0, 6, buf.data(), 500); },
                         {"v1.bin", "token 500", "token offset 3", "byte 1036", "[0, 500)"});
  check_throws<io_error>([&] { r.check_tokens(500); }, {"v1.bin", "token offset 3"});

  LoaderOptions o;
  o.seq_len = 2;
  o.batch_size = 1;
  o.vocab_size = 500;
  TokenLoader l({td.file("v0.bin"), td.file("v1.bin")}, o);  // windows: [1 2 3] [4 5 6] [1 2 499] [500 5 6]
  Ids in(2), tg(2);
  l.read_window(2, in.data(), tg.data());
  check_throws<io_error>([&] { l.read_window(3, in.data(), tg.data()); }, {"v1.bin", "token 500", "token offset 3"});
  check_throws<io_error>(
      [&] {
        while (l.next(in.data(), tg.data())) {
        }
      },
      {"v1.bin", "token offset 3"});
  o.check_tokens_on_open = true;
  check_throws<io_error>([&] { TokenLoader bad({td.file("v0.bin"), td.file("v1.bin")}, o); }, {"v1.bin", "token 500"});
}

BOOST_AUTO_TEST_CASE(utf8_validator) {
  BOOST_CHECK_EQUAL(distilx::data::detail::utf8_find_invalid("plain ascii"), std::string_view::npos);
  BOOST_CHECK_EQUAL(distilx::data::detail::utf8_find_invalid("h\xC3\xA9 \xE2\x82\xAC \xF0\x9F\x98\x80"), std::string_view::npos);
  BOOST_CHECK_EQUAL(distilx::data::detail::utf8_find_invalid("ab\xC0\xAF"), 2u);       // overlong
  BOOST_CHECK_EQUAL(distilx::data::detail::utf8_find_invalid("a\xED\xA0\x80"), 1u);    // surrogate
  BOOST_CHECK_EQUAL(distilx::data::detail::utf8_find_invalid("abc\xF4\x90\x80\x80"), 3u);  // > U+10FFFF
  BOOST_CHECK_EQUAL(distilx::data::detail::utf8_find_invalid("abcd\xE2\x82"), 4u);     // truncated at end
  // Maximal subparts: "\xE2\x82" (truncated) is one U+FFFD, a lone continuation byte another.
  BOOST_CHECK_EQUAL(distilx::data::detail::utf8_replace_invalid("a\xE2\x82z\x80!"), "a\xEF\xBF\xBDz\xEF\xBF\xBD!");
}

BOOST_AUTO_TEST_CASE(corpus_eos_placement_exact) {
  TempDir td;
  spit(td.file("a.txt"), "ab\n\n\ncd\nef\n");
  spit(td.file("b.txt"), "");
  spit(td.file("c.txt"), "  \n\nxyz");

  // One document per file (empty files contribute nothing, not even EOS).
  auto m = build_corpus({td.file("a.txt"), td.file("b.txt"), td.file("c.txt")}, byte_tokens, byte_options(td.file("f")));
  BOOST_CHECK(read_all(m.shard_paths) == concat_docs({"ab\n\n\ncd\nef\n", "  \n\nxyz"}));
  BOOST_CHECK_EQUAL(m.documents, 2);

  // Paragraphs: blank (whitespace-only) lines separate documents; the text between keeps its newlines.
  auto o = byte_options(td.file("p"));
  o.text_split = TextSplit::paragraph;
  m = build_corpus({td.file("a.txt"), td.file("b.txt"), td.file("c.txt")}, byte_tokens, o);
  BOOST_CHECK(read_all(m.shard_paths) == concat_docs({"ab", "cd\nef", "xyz"}));
  BOOST_CHECK_EQUAL(m.documents, 3);

  // Lines: every non-blank line; shards of 4 tokens split the stream anywhere.
  spit(td.file("d.txt"), "one\r\n\ntwo\n   \nthree");
  o = byte_options(td.file("l"));
  o.text_split = TextSplit::line;
  o.shard_tokens = 4;
  m = build_corpus({td.file("d.txt")}, byte_tokens, o);
  const Ids expect = concat_docs({"one", "two", "three"});
  BOOST_CHECK(read_all(m.shard_paths) == expect);
  BOOST_CHECK_EQUAL(m.shard_paths.size(), (expect.size() + 3) / 4);
  BOOST_CHECK_EQUAL(m.shard_paths[0], td.file("l_000000.bin"));
  BOOST_CHECK_EQUAL(m.shard_paths[1], td.file("l_000001.bin"));
  BOOST_CHECK_EQUAL(m.shard_tokens.back(), static_cast<index_t>(expect.size() % 4 ? expect.size() % 4 : 4));
  BOOST_CHECK_EQUAL(m.total_tokens, static_cast<index_t>(expect.size()));

  // The manifest round-trips.
  const CorpusManifest back = read_manifest(td.file("l.json"));
  BOOST_CHECK(back.shard_paths == m.shard_paths);
  BOOST_CHECK(back.shard_tokens == m.shard_tokens);
  BOOST_CHECK_EQUAL(back.total_tokens, m.total_tokens);
  BOOST_CHECK_EQUAL(back.vocab_size, 257);
  BOOST_CHECK_EQUAL(back.eos_id, kEos);
  BOOST_CHECK(back.sources == std::vector<std::string>{td.file("d.txt")});
}

BOOST_AUTO_TEST_CASE(corpus_jsonl_documents_and_errors) {
  TempDir td;
  spit(td.file("d.jsonl"), "{\"text\": \"hi\\n\", \"id\": 1}\n\n{\"id\": 2, \"text\": \"caf\xC3\xA9\"}\r\n{\"text\": \"\"}\n");
  auto m = build_corpus({td.file("d.jsonl")}, byte_tokens, byte_options(td.file("j")));
  BOOST_CHECK(read_all(m.shard_paths) == concat_docs({"hi\n", "caf\xC3\xA9"}));

  // Other field name; kind forced for a file without the .jsonl extension.
  spit(td.file("d.data"), "{\"body\": \"xy\"}\n");
  auto o = byte_options(td.file("k"));
  o.json_field = "body";
  m = build_corpus({CorpusInput(td.file("d.data"), InputKind::jsonl)}, byte_tokens, o);
  BOOST_CHECK(read_all(m.shard_paths) == concat_docs({"xy"}));

  spit(td.file("missing.jsonl"), "{\"text\": \"a\"}\n\n{\"txt\": \"b\"}\n");
  check_throws<io_error>([&] { build_corpus({td.file("missing.jsonl")}, byte_tokens, byte_options(td.file("x"))); },
                         {"missing.jsonl", "line 3", "no field \"text\""});
  spit(td.file("broken.jsonl"), "{\"text\": \"a\"}\n{\"text\": \"b\"\n");
  check_throws<io_error>([&] { build_corpus({td.file("broken.jsonl")}, byte_tokens, byte_options(td.file("x"))); },
                         {"broken.jsonl", "line 2", "invalid JSON"});
  spit(td.file("num.jsonl"), "{\"text\": 5}\n");
  check_throws<io_error>([&] { build_corpus({td.file("num.jsonl")}, byte_tokens, byte_options(td.file("x"))); },
                         {"num.jsonl", "line 1", "number"});
  // Failed builds leave nothing behind.
  BOOST_CHECK(!fs::exists(td.file("x.json")));
  BOOST_CHECK(!fs::exists(td.file("x_000000.bin")));
}

BOOST_AUTO_TEST_CASE(corpus_utf8_and_empty_errors) {
  TempDir td;
  spit(td.file("bad.txt"), "fine line\nbad \xFF here\n");
  check_throws<io_error>([&] { build_corpus({td.file("bad.txt")}, byte_tokens, byte_options(td.file("x"))); },
                         {"bad.txt", "byte offset 14", "UTF-8"});
  auto o = byte_options(td.file("r"));
  o.invalid_utf8 = InvalidUtf8::replace;
  o.text_split = TextSplit::line;
  auto m = build_corpus({td.file("bad.txt")}, byte_tokens, o);
  BOOST_CHECK(read_all(m.shard_paths) == concat_docs({"fine line", "bad \xEF\xBF\xBD here"}));

  spit(td.file("bad.jsonl"), "{\"text\": \"a\"}\n{\"text\": \"\xC3\"}\n");
  check_throws<io_error>([&] { build_corpus({td.file("bad.jsonl")}, byte_tokens, byte_options(td.file("x"))); },
                         {"bad.jsonl", "line 2", "byte offset 24"});

  spit(td.file("empty.txt"), "");
  spit(td.file("blank.jsonl"), "\n\n{\"text\": \"\"}\n");
  check_throws<io_error>(
      [&] { build_corpus({td.file("empty.txt"), td.file("blank.jsonl")}, byte_tokens, byte_options(td.file("x"))); },
      {"no tokens"});
  BOOST_CHECK(!fs::exists(td.file("x.json")));

  auto bad_eos = byte_options(td.file("x"));
  bad_eos.eos_id = 257;
  check_throws<config_error>([&] { build_corpus({td.file("bad.txt")}, byte_tokens, bad_eos); }, {"eos_id 257"});
  spit(td.file("ok.txt"), "fine");
  check_throws<error>([&] { build_corpus({td.file("ok.txt")}, [](std::string_view) { return Ids{300}; },
                                         byte_options(td.file("y"))); },
                      {"ok.txt", "tokenizer returned id 300"});
}

BOOST_AUTO_TEST_CASE(corpus_threads_byte_identical) {
  TempDir td;
  // Enough documents of varied length that small batches and chunks interleave across threads.
  std::vector<CorpusInput> inputs;
  Rng rng(3);
  for (int f = 0; f < 4; ++f) {
    std::string text, jsonl;
    for (int d = 0; d < 60; ++d) {
      std::string doc;
      const auto len = 1 + rng.below(40);
      for (std::uint64_t i = 0; i < len; ++i) doc += static_cast<char>('a' + rng.below(26));
      text += doc + (d % 3 ? "\n" : "\n\n");
      jsonl += nlohmann::json{{"text", doc}, {"n", d}}.dump() + "\n";
    }
    spit(td.file("t" + std::to_string(f) + ".txt"), text);
    spit(td.file("j" + std::to_string(f) + ".jsonl"), jsonl);
    inputs.emplace_back(td.file("t" + std::to_string(f) + ".txt"));
    inputs.emplace_back(td.file("j" + std::to_string(f) + ".jsonl"));
  }
  // A tokenizer with some per-call work, so threads really run concurrently.
  auto tok = [](std::string_view s) {
    Ids v;
    for (std::size_t i = 0; i < s.size(); i += 2) v.push_back(static_cast<std::int32_t>(s[i]) * 2 + (i + 1 < s.size()));
    return v;
  };
  std::vector<CorpusManifest> ms;
  for (int threads : {1, 2, 3}) {
    CorpusOptions o;
    o.output_prefix = td.file("out" + std::to_string(threads) + "/shard");
    o.vocab_size = 300;
    o.eos_id = 299;
    o.threads = threads;
    o.batch_bytes = 700;
    o.shard_tokens = 777;
    o.text_split = TextSplit::line;
    ms.push_back(build_corpus(inputs, tok, o));
  }
  BOOST_REQUIRE_GT(ms[0].shard_paths.size(), 3u);
  for (std::size_t t = 1; t < ms.size(); ++t) {
    BOOST_REQUIRE_EQUAL(ms[t].shard_paths.size(), ms[0].shard_paths.size());
    for (std::size_t s = 0; s < ms[0].shard_paths.size(); ++s)
      BOOST_CHECK(slurp(ms[t].shard_paths[s]) == slurp(ms[0].shard_paths[s]));
    BOOST_CHECK(slurp(td.file("out" + std::to_string(t + 1) + "/shard.json")) == slurp(td.file("out1/shard.json")));
  }
  BOOST_CHECK_EQUAL(ms[0].documents, 4 * 60 * 2);
  const Ids all = read_all(ms[0].shard_paths);
  BOOST_CHECK_EQUAL(std::count(all.begin(), all.end(), 299), 4 * 60 * 2);

  // The first error in document order is reported, whatever the thread count.
  spit(td.file("j1.jsonl"), slurp(td.file("j1.jsonl")) + "{\"no\": 1}\n");
  spit(td.file("j3.jsonl"), slurp(td.file("j3.jsonl")) + "{\"no\": 1}\n");
  for (int threads : {1, 3}) {
    CorpusOptions o;
    o.output_prefix = td.file("err/shard");
    o.vocab_size = 300;
    o.eos_id = 299;
    o.threads = threads;
    o.batch_bytes = 500;
    check_throws<io_error>([&] { build_corpus(inputs, tok, o); }, {"j1.jsonl", "line 61"});
  }
}

BOOST_AUTO_TEST_CASE(corpus_with_tokenizer_json) {
  TempDir td;
  // Byte-level BPE whose byte tokens have id = byte value, one merge "a b" -> 256, and an
  // <|endoftext|> special token (257) that the tokenizer reports as EOS.
  nlohmann::json vocab = nlohmann::json::object();
  for (int b = 0; b < 256; ++b) vocab[byte_level_char(b)] = b;
  vocab["ab"] = 256;
  nlohmann::json j = {
      {"version", "1.0"},
      {"added_tokens",
       {{{"id", 257}, {"content", "<|endoftext|>"}, {"single_word", false}, {"lstrip", false}, {"rstrip", false},
         {"normalized", false}, {"special", true}}}},
      {"normalizer", nullptr},
      {"pre_tokenizer", {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", true}}},
      {"post_processor", nullptr},
      {"decoder", {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", true}, {"use_regex", true}}},
      {"model",
       {{"type", "BPE"}, {"dropout", nullptr}, {"unk_token", nullptr}, {"continuing_subword_prefix", nullptr},
        {"end_of_word_suffix", nullptr}, {"fuse_unk", false}, {"byte_fallback", false}, {"ignore_merges", false},
        {"vocab", vocab}, {"merges", {"a b"}}}}};
  spit(td.file("tokenizer.json"), j.dump());
  const Tokenizer tok = Tokenizer::from_file(td.file("tokenizer.json"));
  BOOST_REQUIRE(tok.eos_id().has_value());
  BOOST_CHECK_EQUAL(*tok.eos_id(), 257);
  BOOST_CHECK(tok.encode("ab c") == (Ids{256, ' ', 'c'}));

  spit(td.file("in.txt"), "ab cab\nzz\n");
  CorpusOptions o;
  o.output_prefix = td.file("tk");
  o.text_split = TextSplit::line;
  o.threads = 2;
  const auto m = build_corpus({td.file("in.txt")}, tok, o);
  BOOST_CHECK_EQUAL(m.eos_id, 257);
  BOOST_CHECK_EQUAL(m.vocab_size, 258);
  BOOST_CHECK(read_all(m.shard_paths) == (Ids{256, ' ', 'c', 256, 257, 'z', 'z', 257}));
}

BOOST_AUTO_TEST_CASE(loader_windows_cover_expected_tokens) {
  TempDir td;
  // 103 tokens in uneven shards (one empty); T = 4 -> windows of 5, 20 windows, 3 tokens unused.
  const auto paths = counting_shards(td, {7, 0, 30, 1, 65});
  LoaderOptions o;
  o.seq_len = 4;
  o.batch_size = 3;
  o.val_windows = 5;
  TokenLoader l(paths, o);
  BOOST_CHECK_EQUAL(l.num_tokens(), 103);
  BOOST_CHECK_EQUAL(l.num_windows(), 20);
  BOOST_CHECK_EQUAL(l.num_train_windows(), 15);
  BOOST_CHECK_EQUAL(l.batches_per_epoch(), 5);
  BOOST_CHECK_EQUAL(l.val_batches(), 1);

  // Every window w holds exactly tokens 5w .. 5w+4 (crossing shard boundaries where needed).
  Ids in(4), tg(4);
  for (index_t w = 0; w < 20; ++w) {
    l.read_window(w, in.data(), tg.data());
    for (index_t t = 0; t < 4; ++t) {
      BOOST_CHECK_EQUAL(in[t], 5 * w + t);
      BOOST_CHECK_EQUAL(tg[t], 5 * w + t + 1);
    }
  }

  // An epoch delivers each training window exactly once, rows as whole windows; the validation
  // windows (the last 5) never appear.
  Ids targets;
  const auto batches = epoch_batches(l, &targets);
  BOOST_CHECK_EQUAL(batches.size(), 5u);
  BOOST_CHECK_EQUAL(l.epoch(), 1);
  BOOST_CHECK_EQUAL(l.position(), 0);
  std::set<index_t> seen;
  for (std::size_t k = 0; k < batches.size(); ++k)
    for (index_t b = 0; b < 3; ++b) {
      const std::int32_t* row = batches[k].data() + 4 * b;
      BOOST_REQUIRE_EQUAL(row[0] % 5, 0);
      for (index_t t = 0; t < 4; ++t) BOOST_CHECK_EQUAL(row[t], row[0] + t);
      for (index_t t = 0; t < 4; ++t)
        BOOST_CHECK_EQUAL(targets[static_cast<std::size_t>((static_cast<index_t>(k) * 3 + b) * 4 + t)], row[0] + t + 1);
      BOOST_CHECK(seen.insert(row[0] / 5).second);
    }
  BOOST_CHECK_EQUAL(seen.size(), 15u);
  BOOST_CHECK_EQUAL(*seen.rbegin(), 14);

  std::set<index_t> val;
  Ids vin(12), vtg(12);
  l.val_batch(0, vin.data(), vtg.data());
  for (index_t b = 0; b < 3; ++b) val.insert(vin[static_cast<std::size_t>(4 * b)] / 5);
  BOOST_CHECK(val == (std::set<index_t>{15, 16, 17}));

  // Fraction form: ceil(0.12 * 20) = 3 validation windows.
  o.val_windows = -1;
  o.val_fraction = 0.12;
  o.batch_size = 2;
  TokenLoader f(paths, o);
  BOOST_CHECK_EQUAL(f.num_val_windows(), 3);
  BOOST_CHECK_EQUAL(f.num_train_windows(), 17);
  BOOST_CHECK_EQUAL(f.batches_per_epoch(), 8);

  o.batch_size = 30;
  check_throws<config_error>([&] { TokenLoader big(paths, o); }, {"103 tokens", "20 windows", "batch_size * world_size = 30"});
}

BOOST_AUTO_TEST_CASE(loader_shuffle_deterministic) {
  TempDir td;
  const auto paths = counting_shards(td, {400, 401});
  LoaderOptions o;
  o.seq_len = 3;
  o.batch_size = 4;
  o.seed = 1234;
  o.val_fraction = 0.1;
  TokenLoader a(paths, o), b(paths, o);
  const auto a0 = epoch_batches(a), b0 = epoch_batches(b);
  BOOST_CHECK(a0 == b0);
  const auto a1 = epoch_batches(a);
  BOOST_CHECK(a0 != a1);  // a new order every epoch
  // 801 tokens: 200 windows, 180 for training = 45 batches of 4, none dropped, so both epochs
  // hold the same batches' rows in a different order.
  BOOST_CHECK_EQUAL(a.batches_per_epoch(), 45);
  std::vector<std::int32_t> w0, w1;
  for (const auto& x : a0)
    for (std::size_t r = 0; r < 4; ++r) w0.push_back(x[3 * r]);
  for (const auto& x : a1)
    for (std::size_t r = 0; r < 4; ++r) w1.push_back(x[3 * r]);
  std::sort(w0.begin(), w0.end());
  std::sort(w1.begin(), w1.end());
  BOOST_CHECK(w0 == w1);
  o.seed = 1235;
  TokenLoader c(paths, o);
  BOOST_CHECK(epoch_batches(c) != a0);
  // Not the identity order.
  o.seed = 1234;
  TokenLoader d(paths, o);
  index_t in_order = 0;
  for (index_t k = 0; k < d.batches_per_epoch(); ++k)
    for (index_t r = 0; r < 4; ++r) in_order += d.train_window(k, r) == k * 4 + r;
  BOOST_CHECK_LT(in_order, 10);
}

BOOST_AUTO_TEST_CASE(loader_ranks_disjoint_and_cover) {
  TempDir td;
  const auto paths = counting_shards(td, {1000});
  LoaderOptions o;
  o.seq_len = 4;
  o.batch_size = 2;
  o.seed = 7;
  o.world_size = 3;
  o.val_windows = 20;  // 200 windows: 180 training, 30 steps of 6, nothing dropped
  std::vector<TokenLoader> ranks;
  for (int r = 0; r < 3; ++r) {
    o.rank = r;
    ranks.emplace_back(paths, o);
  }
  BOOST_CHECK_EQUAL(ranks[0].batches_per_epoch(), 30);
  for (int epoch = 0; epoch < 2; ++epoch) {
    std::set<std::int32_t> all;
    Ids in(8), tg(8);
    for (index_t k = 0; k < 30; ++k) {
      std::set<std::int32_t> step;
      for (auto& l : ranks) {
        BOOST_REQUIRE(l.next(in.data(), tg.data()));
        for (int b = 0; b < 2; ++b) {
          BOOST_CHECK(step.insert(in[static_cast<std::size_t>(4 * b)]).second);  // disjoint within the step
          BOOST_CHECK(all.insert(in[static_cast<std::size_t>(4 * b)]).second);   // and across the epoch
        }
      }
    }
    for (auto& l : ranks) BOOST_CHECK(!l.next(in.data(), tg.data()));
    BOOST_CHECK_EQUAL(all.size(), 180u);  // together the ranks cover every training window
    BOOST_CHECK_EQUAL(*all.rbegin(), 179 * 5);
  }
  // Validation is split across ranks the same way, disjointly.
  std::set<index_t> v;
  for (auto& l : ranks)
    for (index_t k = 0; k < l.val_batches(); ++k)
      for (index_t b = 0; b < 2; ++b) BOOST_CHECK(v.insert(l.val_window(k, b)).second);
  BOOST_CHECK_EQUAL(v.size(), 18u);  // 20 validation windows, 2 beyond a multiple of B*W unused
  BOOST_CHECK_EQUAL(*v.begin(), 180);

  // With a remainder, every rank still gets the same number of batches.
  o.val_windows = 0;
  o.rank = 2;
  TokenLoader rem(paths, o);
  BOOST_CHECK_EQUAL(rem.batches_per_epoch(), 200 / 6);
}

BOOST_AUTO_TEST_CASE(loader_resume_exact) {
  TempDir td;
  const auto paths = counting_shards(td, {300, 333});
  LoaderOptions o;
  o.seq_len = 5;
  o.batch_size = 3;
  o.seed = 99;
  o.val_fraction = 0.05;
  o.world_size = 2;
  o.rank = 1;
  // Reference: an uninterrupted run over 2.5 epochs, recording (returned, inputs, targets).
  struct Step {
    bool ok;
    Ids in, tg;
    bool operator==(const Step& s) const { return ok == s.ok && in == s.in && tg == s.tg; }
  };
  auto run = [](TokenLoader& l, int n) {
    std::vector<Step> out;
    for (int i = 0; i < n; ++i) {
      Step s{false, Ids(15), Ids(15)};
      s.ok = l.next(s.in.data(), s.tg.data());
      out.push_back(std::move(s));
    }
    return out;
  };
  TokenLoader ref(paths, o);
  const index_t per = ref.batches_per_epoch();
  const int total = static_cast<int>(per * 5 / 2);
  const auto expected = run(ref, total);

  for (int cut : {0, 7, static_cast<int>(per), static_cast<int>(per) + 1, static_cast<int>(per) + 5}) {
    TokenLoader first(paths, o);
    run(first, cut);
    const std::string saved = first.state().to_json();
    TokenLoader resumed(paths, o);
    resumed.set_state(LoaderState::from_json(saved));
    BOOST_CHECK(resumed.state() == first.state());
    const auto rest = run(resumed, total - cut);
    BOOST_CHECK_MESSAGE(std::equal(rest.begin(), rest.end(), expected.begin() + cut), "resume at step " << cut);
  }

  // A state from a differently shaped loader is refused.
  TokenLoader a(paths, o);
  o.batch_size = 4;
  o.val_windows = 8;
  TokenLoader b(paths, o);
  check_throws<config_error>([&] { b.set_state(a.state()); }, {"batch_size 3", "set_state"});
  check_throws<io_error>([&] { LoaderState::from_json("{\"seed\": 1}"); }, {"malformed"});
}

BOOST_AUTO_TEST_CASE(loader_from_manifest) {
  TempDir td;
  spit(td.file("a.txt"), std::string(499, 'q'));
  auto o = byte_options(td.file("ds/corpus"));
  o.shard_tokens = 100;
  build_corpus({td.file("a.txt")}, byte_tokens, o);
  LoaderOptions lo;
  lo.seq_len = 9;
  lo.batch_size = 5;
  TokenLoader l = TokenLoader::from_manifest(td.file("ds/corpus.json"), lo);
  BOOST_CHECK_EQUAL(l.num_tokens(), 500);
  BOOST_CHECK_EQUAL(l.options().vocab_size, 257);
  Ids in(45), tg(45);
  l.read_window(49, in.data(), tg.data());  // tokens 490..499, the last is EOS
  BOOST_CHECK_EQUAL(in[0], 'q');
  BOOST_CHECK_EQUAL(tg[8], kEos);

  // A shard replaced behind the manifest's back is caught.
  write_shard(td.file("ds/corpus_000002.bin"), Ids(99, 'q'));
  check_throws<io_error>([&] { TokenLoader::from_manifest(td.file("ds/corpus.json"), lo); },
                         {"corpus_000002.bin", "99 tokens", "manifest says 100"});
}

BOOST_AUTO_TEST_SUITE_END()
