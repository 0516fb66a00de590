// Tests of the tokenizer.json tokenizer (distilx/data/tokenizer.hpp): a hand-written byte-level
// BPE whose ids are derived by hand, rejection of bad files, NFC against known compositions, and
// parity with Hugging Face ids for the real Qwen3 and Llama-3 tokenizers on a multilingual corpus
// (reference ids from transformers.js, scripts/tokenizer-reference). The real tokenizer.json files
// are extracted by a ctest fixture into $DISTILX_TOKENIZER_DIR/{qwen3,llama3}/tokenizer.json.
#include <boost/test/unit_test.hpp>

#include "test_util.hpp"

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "distilx/data/tokenizer.hpp"

#ifndef DISTILX_TEST_DATA_DIR
#define DISTILX_TEST_DATA_DIR "tests/data"
#endif

namespace {

using distilx::Tokenizer;
using Ids = std::vector<std::int32_t>;

std::string tok_data(const std::string& name) { return std::string(DISTILX_TEST_DATA_DIR) + "/tokenizer/" + name; }

std::string slurp(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  BOOST_REQUIRE_MESSAGE(in, "cannot open " << path);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::vector<nlohmann::json> read_jsonl(const std::string& path) {
  std::vector<nlohmann::json> out;
  std::istringstream in(slurp(path));
  std::string line;
  while (std::getline(in, line))
    if (!line.empty()) out.push_back(nlohmann::json::parse(line));
  return out;
}

/// A corpus case: a JSON string (UTF-8 text) or an array of byte values (maybe ill-formed).
struct Case {
  std::string bytes;
  bool raw_bytes = false;
};

/// The hand-written corpus followed by the seeded random cases that gen.mjs stitched together.
std::vector<Case> read_corpus() {
  std::vector<Case> cases;
  auto lines = read_jsonl(tok_data("corpus.jsonl"));
  const auto random = read_jsonl(tok_data("corpus_random.jsonl"));
  lines.insert(lines.end(), random.begin(), random.end());
  for (const auto& j : lines) {
    Case c;
    if (j.is_array()) {
      c.raw_bytes = true;
      for (const auto& b : j) c.bytes.push_back(static_cast<char>(b.get<int>()));
    } else {
      c.bytes = j.get<std::string>();
    }
    cases.push_back(std::move(c));
  }
  return cases;
}

/// Path of an extracted real tokenizer; fails the test (not skips) when the fixture did not run.
std::string real_tokenizer_path(const std::string& name) {
  const char* dir = std::getenv("DISTILX_TOKENIZER_DIR");
  BOOST_REQUIRE_MESSAGE(dir != nullptr && *dir != '\0',
                        "DISTILX_TOKENIZER_DIR is not set: it must name the folder where the ctest fixture "
                        "(tests/data/tokenizer/extract.cmake) extracted qwen3/ and llama3/tokenizer.json");
  const std::string path = std::string(dir) + "/" + name + "/tokenizer.json";
  BOOST_REQUIRE_MESSAGE(std::ifstream(path).good(), "missing " << path << " (run tests/data/tokenizer/extract.cmake)");
  return path;
}

std::string ids_str(const Ids& ids) {
  std::ostringstream os;
  for (std::size_t i = 0; i < ids.size(); ++i) os << (i ? "," : "") << ids[i];
  return os.str();
}

/// Compares encode/decode with the reference file; returns the number of cases checked.
std::size_t check_parity(const Tokenizer& tok, const std::string& expected_file, const char* ids_key = "ids",
                         bool add_special = false) {
  const auto cases = read_corpus();
  const auto expected = read_jsonl(tok_data(expected_file));
  BOOST_REQUIRE_EQUAL(cases.size(), expected.size());
  std::size_t mismatches = 0;
  for (std::size_t i = 0; i < cases.size(); ++i) {
    const auto& exp = expected[i];
    BOOST_REQUIRE_EQUAL(exp.at("case").get<std::size_t>(), i);
    const Ids want = exp.at(ids_key).get<Ids>();
    const Ids got = tok.encode(cases[i].bytes, add_special);
    if (got != want) {
      ++mismatches;
      BOOST_ERROR(expected_file << " case " << i << ": ids differ\n  want " << ids_str(want) << "\n  got  "
                                << ids_str(got));
    }
    if (add_special) continue;
    // decode(encode(x)) == x, or the reference's NFC / U+FFFD-substituted form of x.
    const std::string want_text = exp.contains("roundtrip") ? exp["roundtrip"].get<std::string>() : cases[i].bytes;
    if (!cases[i].raw_bytes && !exp.contains("roundtrip")) BOOST_CHECK(want_text == cases[i].bytes);
    BOOST_CHECK_MESSAGE(tok.decode(got) == want_text, expected_file << " case " << i << ": round trip differs");
    if (exp.contains("decoded_reversed")) {
      const Ids rev(want.rbegin(), want.rend());
      BOOST_CHECK_MESSAGE(tok.decode(rev) == exp["decoded_reversed"].get<std::string>(),
                          expected_file << " case " << i << ": decode of reversed ids differs");
    }
  }
  BOOST_TEST_MESSAGE(expected_file << ": " << cases.size() - mismatches << "/" << cases.size() << " cases identical");
  return cases.size();
}

// A byte-level BPE small enough to derive every id by hand. Merge ranks: "a b" < "ab c" <
// "Ġ a" < "Ġa b" (Ġ is the byte-level character of the space).
const char* kTinyJson = R"({
  "version": "1.0",
  "added_tokens": [
    {"id": 9, "content": "<s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
    {"id": 10, "content": "<|end|>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
    {"id": 12, "content": "<mask>", "single_word": false, "lstrip": true, "rstrip": true, "normalized": false, "special": true},
    {"id": 13, "content": "xyz", "single_word": true, "lstrip": false, "rstrip": false, "normalized": false, "special": false}
  ],
  "normalizer": null,
  "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
  "post_processor": {
    "type": "TemplateProcessing",
    "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
               {"SpecialToken": {"id": "<|end|>", "type_id": 0}}],
    "pair": [],
    "special_tokens": {"<s>": {"id": "<s>", "ids": [9], "tokens": ["<s>"]},
                       "<|end|>": {"id": "<|end|>", "ids": [10], "tokens": ["<|end|>"]}}
  },
  "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
  "model": {
    "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
    "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
    "vocab": {"a": 0, "b": 1, "c": 2, "Ġ": 3, "ab": 4, "abc": 5, "Ġa": 6, "Ġab": 7, "!": 8,
              "x": 14, "y": 15, "z": 16},
    "merges": ["a b", ["ab", "c"], "Ġ a", ["Ġa", "b"]]
  }
})";

std::string write_temp(const std::string& name, const std::string& text) {
  const std::string path = "/tmp/distilx_test_tokenizer_" + name;
  std::ofstream(path, std::ios::binary) << text;
  return path;
}

using distilx::test_util::check_throws;

}  // namespace

BOOST_AUTO_TEST_SUITE(tokenizer)

BOOST_AUTO_TEST_CASE(hand_written_bpe_ids) {
  const Tokenizer tok = Tokenizer::from_json(kTinyJson);
  // "abc ab!" -> pieces "abc", " ab", "!". In "abc": a+b (rank 0), then ab+c (rank 1).
  // In "Ġab": a+b (rank 0) beats Ġ+a (rank 2), and no merge joins Ġ with ab.
  BOOST_CHECK(tok.encode("abc ab!") == (Ids{5, 3, 4, 8}));
  BOOST_CHECK(tok.encode("aab") == (Ids{0, 4}));             // a | a+b
  BOOST_CHECK(tok.encode(" a") == (Ids{6}));                 // Ġ+a
  BOOST_CHECK(tok.encode(" abc") == (Ids{3, 5}));            // Ġ | (a+b)+c
  BOOST_CHECK(tok.encode("d").empty());                      // no 'd', no unk_token: dropped as HF does
  BOOST_CHECK(tok.encode("").empty());
  // Added tokens split the text before the pre-tokenizer.
  BOOST_CHECK(tok.encode("ab<|end|>c") == (Ids{4, 10, 2}));
  // lstrip/rstrip: the spaces around <mask> belong to it.
  BOOST_CHECK(tok.encode("a  <mask>  b") == (Ids{0, 12, 1}));
  // single_word: "xyz" is the added token only when not inside a word.
  BOOST_CHECK(tok.encode("a xyz!") == (Ids{0, 3, 13, 8}));
  BOOST_CHECK(tok.encode("axyz") == (Ids{0, 14, 15, 16}));
  // Template post-processor: <s> A <|end|>.
  BOOST_CHECK(tok.encode("a", true) == (Ids{9, 0, 10}));
  BOOST_CHECK(tok.bos_id() == std::optional<std::int32_t>(9));
  BOOST_CHECK(tok.eos_id() == std::optional<std::int32_t>(10));
  // Decode.
  BOOST_CHECK_EQUAL(tok.decode({5, 3, 4, 8}), "abc ab!");
  BOOST_CHECK_EQUAL(tok.decode({9, 0, 10}), "<s>a<|end|>");
  BOOST_CHECK_EQUAL(tok.decode({9, 0, 10}, true), "a");
  BOOST_CHECK_EQUAL(tok.decode({9, 0, 13}, true), "axyz");  // xyz is added but not special
  BOOST_CHECK_EQUAL(tok.decode({0, 999, 1}), "ab");          // unknown ids are skipped, as in HF
  // Lookups.
  BOOST_CHECK_EQUAL(tok.vocab_size(), 17);
  BOOST_CHECK(tok.token_to_id("Ġab") == std::optional<std::int32_t>(7));
  BOOST_CHECK(tok.token_to_id("<mask>") == std::optional<std::int32_t>(12));
  BOOST_CHECK(!tok.token_to_id("nope"));
  BOOST_CHECK_EQUAL(tok.id_to_token(6), "Ġa");
  BOOST_CHECK_EQUAL(tok.id_to_token(10), "<|end|>");
  BOOST_CHECK_THROW(tok.id_to_token(11), distilx::error);
  BOOST_CHECK(tok.is_special(10) && !tok.is_special(13) && !tok.is_special(0));
}

BOOST_AUTO_TEST_CASE(hand_written_options) {
  auto j = nlohmann::json::parse(kTinyJson);
  // ignore_merges (Llama-3): a word that is a token is taken whole, whatever the ranks say.
  j["model"]["ignore_merges"] = true;
  BOOST_CHECK(Tokenizer::from_json(j.dump()).encode(" ab") == (Ids{7}));
  BOOST_CHECK(Tokenizer::from_json(kTinyJson).encode(" ab") == (Ids{3, 4}));
  j["model"]["ignore_merges"] = false;
  // add_prefix_space puts a space before the text: "ab" is then the word "Ġab".
  j["pre_tokenizer"]["add_prefix_space"] = true;
  BOOST_CHECK(Tokenizer::from_json(j.dump()).encode("ab") == (Ids{3, 4}));
  j["pre_tokenizer"]["add_prefix_space"] = false;
  // A Split pre-tokenizer with behaviour Removed drops the matches (here the spaces).
  j["pre_tokenizer"] = nlohmann::json::parse(R"({"type": "Sequence", "pretokenizers": [
      {"type": "Split", "pattern": {"String": " "}, "behavior": "Removed", "invert": false},
      {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false}]})");
  BOOST_CHECK(Tokenizer::from_json(j.dump()).encode("ab  abc") == (Ids{4, 5}));
  // MergedWithNext keeps the space with the following word: "c", " ab" -> c | Ġ ab (a+b outranks Ġ+a).
  j["pre_tokenizer"]["pretokenizers"][0]["behavior"] = "MergedWithNext";
  BOOST_CHECK(Tokenizer::from_json(j.dump()).encode("c ab") == (Ids{2, 3, 4}));
  // unk_token with fuse_unk: consecutive unknown characters become one <unk>.
  auto u = nlohmann::json::parse(kTinyJson);
  u["model"]["vocab"]["<unk>"] = 17;
  u["model"]["unk_token"] = "<unk>";
  BOOST_CHECK(Tokenizer::from_json(u.dump()).encode("dda") == (Ids{17, 17, 0}));
  u["model"]["fuse_unk"] = true;
  BOOST_CHECK(Tokenizer::from_json(u.dump()).encode("dda") == (Ids{17, 0}));
  // Without a post-processor, add_special_tokens adds nothing and bos/eos come from conventions.
  auto n = nlohmann::json::parse(kTinyJson);
  n["post_processor"] = nullptr;
  const Tokenizer plain = Tokenizer::from_json(n.dump());
  BOOST_CHECK(plain.encode("a", true) == (Ids{0}));
  BOOST_CHECK(plain.bos_id() == std::optional<std::int32_t>(9));  // "<s>"
  BOOST_CHECK(!plain.eos_id());
}

BOOST_AUTO_TEST_CASE(bad_inputs_are_refused) {
  check_throws<distilx::io_error>([] { Tokenizer::from_file("/nonexistent/dir/tokenizer.json"); },
                                  {"/nonexistent/dir/tokenizer.json", "cannot open"});
  const std::string bad_json = write_temp("malformed.json", "{\"model\": {\"type\": \"BPE\", ");
  check_throws<distilx::io_error>([&] { Tokenizer::from_file(bad_json); }, {bad_json, "malformed JSON"});
  for (const char* type : {"Unigram", "WordPiece", "WordLevel"}) {
    auto j = nlohmann::json::parse(kTinyJson);
    j["model"]["type"] = type;
    const std::string path = write_temp(std::string(type) + ".json", j.dump());
    check_throws<distilx::config_error>([&] { Tokenizer::from_file(path); },
                                        {path, "unsupported model type", type});
  }
  {
    auto j = nlohmann::json::parse(kTinyJson);
    j["normalizer"] = {{"type", "NFKC"}};
    const std::string path = write_temp("nfkc.json", j.dump());
    check_throws<distilx::config_error>([&] { Tokenizer::from_file(path); }, {path, "normalizer", "NFKC"});
  }
  {
    auto j = nlohmann::json::parse(kTinyJson);
    j["pre_tokenizer"] = {{"type", "Metaspace"}, {"replacement", "▁"}};
    const std::string path = write_temp("metaspace.json", j.dump());
    check_throws<distilx::config_error>([&] { Tokenizer::from_file(path); }, {path, "pre_tokenizer", "Metaspace"});
  }
  {
    auto j = nlohmann::json::parse(kTinyJson);
    j["model"]["merges"].push_back("a zz");  // token not in the vocabulary
    check_throws<distilx::io_error>([&] { Tokenizer::from_json(j.dump(), "tiny.json"); }, {"tiny.json", "'zz'"});
  }
  {
    auto j = nlohmann::json::parse(kTinyJson);
    j.erase("model");
    check_throws<distilx::io_error>([&] { Tokenizer::from_json(j.dump(), "nomodel.json"); },
                                    {"nomodel.json", "model"});
  }
}

BOOST_AUTO_TEST_CASE(nfc_normalization) {
  namespace u = distilx::detail::unicode;
  BOOST_CHECK_EQUAL(u::nfc("e\xCC\x81"), "\xC3\xA9");                  // e + acute -> é
  BOOST_CHECK_EQUAL(u::nfc("\xE2\x84\xAB"), "\xC3\x85");               // Angstrom sign -> Å (singleton)
  BOOST_CHECK_EQUAL(u::nfc("a\xCC\x82\xCC\xA3"), "\xE1\xBA\xAD");      // a + circumflex + dot below -> ậ (reordered)
  BOOST_CHECK_EQUAL(u::nfc("\xE1\x84\x80\xE1\x85\xA1\xE1\x86\xA8"), "\xEA\xB0\x81");  // Hangul jamo -> 각
  BOOST_CHECK_EQUAL(u::nfc("\xE0\xA5\x98"), "\xE0\xA4\x95\xE0\xA4\xBC");  // U+0958 is excluded from composition
  BOOST_CHECK_EQUAL(u::nfd("\xC3\xA9"), "e\xCC\x81");
  BOOST_CHECK_EQUAL(u::nfc("plain ASCII"), "plain ASCII");
  // Ill-formed UTF-8: one U+FFFD per maximal subpart.
  BOOST_CHECK_EQUAL(u::sanitize_utf8("\xE4\xB8"), "\xEF\xBF\xBD");
  BOOST_CHECK_EQUAL(u::sanitize_utf8("\xB8\xE4"), "\xEF\xBF\xBD\xEF\xBF\xBD");
  BOOST_CHECK_EQUAL(u::sanitize_utf8("\xED\xA0\x80"), "\xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD");
  BOOST_CHECK_EQUAL(u::sanitize_utf8("a\xF0\x9F\x98" "b"), "a\xEF\xBF\xBD" "b");
}

BOOST_AUTO_TEST_CASE(qwen3_parity) {
  const Tokenizer tok = Tokenizer::from_file(real_tokenizer_path("qwen3"));
  BOOST_CHECK_EQUAL(tok.vocab_size(), 151669);
  BOOST_CHECK(!tok.bos_id());
  BOOST_CHECK(tok.eos_id() == std::optional<std::int32_t>(151643));  // <|endoftext|>
  BOOST_CHECK(tok.token_to_id("<|im_start|>") == std::optional<std::int32_t>(151644));
  const std::size_t n = check_parity(tok, "qwen3_expected.jsonl");
  BOOST_CHECK_GE(n, 80u);
  // Digits are split one by one (\p{N} in Qwen's pattern).
  BOOST_CHECK_EQUAL(tok.encode("2024").size(), 4u);
  // Byte tokens that do not form UTF-8 decode to U+FFFD per maximal subpart: E4 B8 is the start of
  // a 3-byte sequence (one U+FFFD), B8 E4 are two separate errors.
  const auto e4 = tok.token_to_id("\xC3\xA4"), b8 = tok.token_to_id("\xC2\xB8");  // byte chars of E4, B8
  BOOST_REQUIRE(e4 && b8);
  BOOST_CHECK_EQUAL(tok.decode({*e4, *b8}), "\xEF\xBF\xBD");
  BOOST_CHECK_EQUAL(tok.decode({*b8, *e4}), "\xEF\xBF\xBD\xEF\xBF\xBD");
  BOOST_CHECK(tok.encode("\xE4\xB8") == tok.encode("\xEF\xBF\xBD"));
  BOOST_CHECK_EQUAL(tok.decode(tok.encode("<|im_start|>user\nhi<|im_end|>"), true), "user\nhi");
}

BOOST_AUTO_TEST_CASE(qwen3_threads_and_long_input) {
  const Tokenizer tok = Tokenizer::from_file(real_tokenizer_path("qwen3"));
  const auto cases = read_corpus();
  const auto expected = read_jsonl(tok_data("qwen3_expected.jsonl"));
  // Several threads share one tokenizer (and its word cache); every result must still match.
  std::vector<int> failures(4, 0);
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([&, t] {
      for (int rep = 0; rep < 3; ++rep)
        for (std::size_t i = 0; i < cases.size(); ++i)
          if (tok.encode(cases[(i + static_cast<std::size_t>(t) * 7) % cases.size()].bytes) !=
              expected[(i + static_cast<std::size_t>(t) * 7) % cases.size()].at("ids").get<Ids>())
            ++failures[static_cast<std::size_t>(t)];
    });
  for (auto& th : threads) th.join();
  for (int f : failures) BOOST_CHECK_EQUAL(f, 0);
  // A very long whitespace run and a long word exercise the regex stack and the uncached path.
  const std::string spaces(200000, ' '), word(5000, 'x');
  BOOST_CHECK_EQUAL(tok.decode(tok.encode(spaces)), spaces);
  BOOST_CHECK_EQUAL(tok.decode(tok.encode(word + "\n" + spaces + word)), word + "\n" + spaces + word);
}

BOOST_AUTO_TEST_CASE(llama3_parity) {
  const std::string path = real_tokenizer_path("llama3");
  const Tokenizer tok = Tokenizer::from_file(path);
  BOOST_CHECK_EQUAL(tok.vocab_size(), 128256);
  BOOST_CHECK(tok.bos_id() == std::optional<std::int32_t>(128000));  // <|begin_of_text|>
  BOOST_CHECK(tok.eos_id() == std::optional<std::int32_t>(128001));  // <|end_of_text|>
  const std::size_t n = check_parity(tok, "llama3_expected.jsonl");
  BOOST_CHECK_GE(n, 80u);
  // Meta's post-processor (ByteLevel + TemplateProcessing) prepends <|begin_of_text|>.
  auto j = nlohmann::json::parse(slurp(path));
  j["post_processor"] = nlohmann::json::parse(slurp(tok_data("llama3_template_post_processor.json")));
  const Tokenizer with_bos = Tokenizer::from_json(j.dump(), path + " (template)");
  check_parity(with_bos, "llama3_expected.jsonl", "ids_with_bos", true);
  BOOST_CHECK(with_bos.bos_id() == std::optional<std::int32_t>(128000));
}

BOOST_AUTO_TEST_SUITE_END()
