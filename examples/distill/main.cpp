// The distilx command-line app: distill, eval, generate, tokenize, export, import,
// plot, and (with no arguments) the embedded demo. GNU conventions: --help and
// --version on stdout (exit 0), usage errors on stderr (exit 2), failures as one
// clear line on stderr (exit 1). Options come from the command line, then from
// an INI file given with --config (the command line wins).
#include <boost/program_options.hpp>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <sstream>

#ifdef DISTILX_APP_CUDA  // built by nvcc as examples/distill/main_cuda.cu: both backends
#include "distilx/cuda.cuh"
#ifdef DISTILX_HAS_NCCL  // multi-GPU data parallelism: --gpus N, or mpirun / srun / RANK+WORLD_SIZE
#define DISTILX_APP_NCCL 1
#include "distilx/parallel/data_parallel.cuh"
#include "distilx/parallel/launch.hpp"
#endif
#else
#include "distilx/distilx.hpp"
#endif
#include "callbacks.hpp"  // after the library (in a CUDA build, after its op overloads)

namespace po = boost::program_options;
namespace fs = std::filesystem;
using namespace distilx;

#ifndef DISTILX_DEMO_DIR
#define DISTILX_DEMO_DIR ""
#endif
#ifndef DISTILX_SHARE_DIR
#define DISTILX_SHARE_DIR ""
#endif

namespace {

using F = float;
using TeacherF = LlamaTeacher<F>;
using StudentF = Student<F>;

struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// ---------------------------------------------------------------------------------------------
// Option handling shared by the subcommands.

std::string value_string(const po::variable_value& v) {
  const boost::any& a = v.value();
  if (auto p = boost::any_cast<std::string>(&a)) return *p;
  if (auto p = boost::any_cast<long>(&a)) return std::to_string(*p);
  if (auto p = boost::any_cast<int>(&a)) return std::to_string(*p);
  if (auto p = boost::any_cast<unsigned long>(&a)) return std::to_string(*p);
  if (auto p = boost::any_cast<bool>(&a)) return *p ? "true" : "false";
  if (auto p = boost::any_cast<double>(&a)) {
    std::ostringstream os;
    os.precision(17);
    os << *p;
    return os.str();
  }
  if (auto p = boost::any_cast<std::vector<std::string>>(&a)) {
    std::string s;
    for (const auto& x : *p) s += (s.empty() ? "" : " ") + x;
    return s;
  }
  return "?";
}

/// Parses argv (after the subcommand) plus an optional --config INI file.
po::variables_map parse(int argc, char** argv, const po::options_description& desc,
                        const po::positional_options_description* pos = nullptr) {
  po::variables_map vm;
  try {
    auto parser = po::command_line_parser(argc, argv).options(desc);
    if (pos) parser.positional(*pos);
    po::store(parser.run(), vm);
    if (vm.count("config")) {
      const std::string path = vm["config"].as<std::string>();
      std::ifstream in(path);
      if (!in) throw UsageError("cannot read config file '" + path + "'");
      po::store(po::parse_config_file(in, desc, false), vm);
    }
    po::notify(vm);
  } catch (const po::error& e) {
    throw UsageError(e.what());
  }
  return vm;
}

/// --print-config: the effective options as an INI file that --config reads back.
void print_config(const po::variables_map& vm, const po::options_description& desc) {
  for (const auto& o : desc.options()) {
    const std::string n = o->long_name();
    if (n == "help" || n == "config" || n == "print-config" || !vm.count(n)) continue;
    const auto& v = vm[n];
    if (boost::any_cast<bool>(&v.value())) {
      std::cout << n << " = " << (v.as<bool>() ? "true" : "false") << "\n";
      continue;
    }
    if (auto p = boost::any_cast<std::vector<std::string>>(&v.value())) {
      for (const auto& x : *p) std::cout << n << " = " << x << "\n";
      continue;
    }
    std::cout << n << " = " << value_string(v) << "\n";
  }
}

bool help_requested(const po::variables_map& vm, const po::options_description& desc, const char* usage) {
  if (!vm.count("help")) return false;
  std::cout << usage << "\n\n" << desc << "\n";
  return true;
}

po::options_description common_options() {
  po::options_description d("General");
  d.add_options()("help,h", "show this help and exit")("config", po::value<std::string>(),
                                                         "read options from an INI file (the command line wins)")(
      "print-config", "print the effective options as INI and exit")(
      "threads", po::value<int>()->default_value(0), "CPU threads (0: all cores)");
  return d;
}

void apply_threads(const po::variables_map& vm) {
  const int t = vm["threads"].as<int>();
  if (t > 0) {
#ifdef _OPENMP
    omp_set_num_threads(t);
#endif
  }
}

// ---------------------------------------------------------------------------------------------
// distill

po::options_description distill_options() {
  po::options_description d("distill options");
  d.add_options()
      ("teacher", po::value<std::string>(), "teacher directory (config.json, *.safetensors, tokenizer.json)")
      ("data", po::value<std::vector<std::string>>()->multitoken(), "training data: .txt, .jsonl, token shards (.bin) or a shard manifest (.json)")
      ("val-data", po::value<std::vector<std::string>>()->multitoken(), "held-out data (same kinds); default: --val-fraction of --data")
      ("out", po::value<std::string>(), "run directory (checkpoints, metrics, the final student)")
      ("resume", po::bool_switch(), "continue the run in --out from its last checkpoint")
      ("tokenizer", po::value<std::string>(), "tokenizer.json (default: the teacher's)")
      ("text-split", po::value<std::string>()->default_value("paragraph"), "text files: file, paragraph or line documents")
      ("json-field", po::value<std::string>()->default_value("text"), "JSON-lines: the text field")
      ("val-fraction", po::value<double>()->default_value(0.05, "0.05"), "held-out share of --data when --val-data is not given")
      ("steps", po::value<long>()->default_value(1000), "optimizer steps")
      ("batch", po::value<long>()->default_value(4), "sequences per micro-batch")
      ("seq", po::value<long>()->default_value(512), "tokens per sequence")
      ("grad-accum", po::value<long>()->default_value(5), "micro-batches per optimizer step")
      ("lr", po::value<double>()->default_value(2e-4, "2e-4"), "peak learning rate")
      ("warmup", po::value<double>()->default_value(0.1, "0.1"), "warm-up: a fraction of --steps (< 1) or a step count")
      ("min-lr-ratio", po::value<double>()->default_value(0.0, "0.0"), "cosine floor as a fraction of --lr")
      ("weight-decay", po::value<double>()->default_value(0.01, "0.01"), "AdamW decoupled weight decay")
      ("clip", po::value<double>()->default_value(1.0, "1.0"), "global gradient-norm clip (0: off)")
      ("blocks", po::value<std::string>()->default_value("6"), "student blocks: same, half or a number")
      ("heads", po::value<std::string>()->default_value("16"), "student heads: teacher (ceil(H/4)) or a number")
      ("pattern", po::value<std::string>()->default_value("alternate_slstm_first"), "alternate_slstm_first, alternate_mlstm_first or mlstm_only")
      ("qkv-blocksize", po::value<long>()->default_value(32), "mLSTM q/k/v block size")
      ("mlstm-factor", po::value<double>()->default_value(2.0, "2.0"), "mLSTM up-projection factor")
      ("ffn-factor", po::value<double>()->default_value(1.7, "1.7"), "sLSTM block FFN factor")
      ("conv", po::value<long>()->default_value(4), "causal conv kernel size")
      ("chunk", po::value<long>()->default_value(64), "mLSTM chunk size (chunkwise form beyond it)")
      ("divergence", po::value<std::string>()->default_value("forward_kl"), "forward_kl, reverse_kl, jsd or skew_kl")
      ("beta", po::value<double>()->default_value(0.5, "0.5"), "mixture weight of jsd / skew_kl")
      ("alignment", po::value<std::string>()->default_value("ratio"), "hidden-state alignment: none, ratio, average, block_wise, cosine")
      ("schedule", po::value<std::string>()->default_value("delta"), "delta (logarithmic annealing) or fixed")
      ("tau", po::value<double>()->default_value(2.0, "2.0"), "temperature start")
      ("tau-floor", po::value<double>()->default_value(1.0, "1.0"), "temperature floor")
      ("kl-weight", po::value<double>()->default_value(0.2, "0.2"), "KL weight start")
      ("kl-floor", po::value<double>()->default_value(0.1, "0.1"), "KL weight floor")
      ("al-weight", po::value<double>()->default_value(0.01, "0.01"), "alignment weight start")
      ("al-floor", po::value<double>()->default_value(0.001, "0.001"), "alignment weight floor")
      ("delta", po::value<double>()->default_value(0.01, "0.01"), "per-epoch decay of the start values")
      ("additive-alignment", po::bool_switch(), "w_ce = 1 - w_kl - w_al (instead of 1 - w_kl)")
      ("eval-every", po::value<long>()->default_value(0), "evaluate every N steps (0: at the end)")
      ("eval-batches", po::value<long>()->default_value(0), "validation batches per evaluation (0: all)")
      ("checkpoint-every", po::value<long>()->default_value(200), "checkpoint every N steps (0: at the end)")
      ("keep", po::value<long>()->default_value(3), "checkpoints to keep")
      ("log-every", po::value<long>()->default_value(1), "progress line every N steps")
      ("seed", po::value<unsigned long>()->default_value(42), "seed for initialisation and data order")
      ("device", po::value<std::string>()->default_value("cpu"), "cpu or cuda (a build with the CUDA toolkit)")
      ("precision", po::value<std::string>()->default_value("auto"), "GPU math: auto (= bf16), bf16, fp16 (with dynamic loss scaling), tf32 or fp32")
      ("gpus", po::value<int>()->default_value(1), "data-parallel GPUs on this machine (one process each; --batch is per GPU). mpirun/srun launches work too")
      ("zero", po::value<std::string>()->default_value("replicate"), "multi-GPU optimizer state: replicate, or zero1 (sharded AdamW state)");
  return d;
}

/// Checks --device / --precision; selects the GPU math mode. Returns true for cuda.
bool apply_device(const po::variables_map& vm, DistillerConfig* dc) {
  const std::string dev = vm["device"].as<std::string>(), prec = vm["precision"].as<std::string>();
  if (dev != "cpu" && dev != "cuda") throw UsageError("--device must be cpu or cuda (got '" + dev + "')");
  if (prec != "auto" && prec != "bf16" && prec != "fp16" && prec != "tf32" && prec != "fp32")
    throw UsageError("--precision must be auto, bf16, fp16, tf32 or fp32 (got '" + prec + "')");
  if (dev == "cpu") {
    if (prec != "auto" && prec != "fp32")
      throw UsageError("--precision " + prec + " needs --device cuda (the CPU computes in fp32)");
    return false;
  }
#ifdef DISTILX_APP_CUDA
  DISTILX_REQUIRE(error, cuda_device_available(), "--device cuda: no CUDA device is visible (check nvidia-smi and "
                  "CUDA_VISIBLE_DEVICES), or use --device cpu");
  using cuda_backend::MathMode;
  const MathMode m = prec == "fp16" ? MathMode::fp16 : prec == "tf32" ? MathMode::tf32
                   : prec == "fp32" ? MathMode::fp32 : MathMode::bf16;
  cuda_backend::set_math_mode(m);
  if (dc && m == MathMode::fp16) dc->loss_scale.enabled = true;
  return true;
#else
  (void)dc;
  throw error("--device cuda: this distilx was built without CUDA; configure with the CUDA toolkit installed "
              "(nvcc found, see docs/cuda.md) or use --device cpu");
#endif
}

struct DataPlan {
  std::vector<std::string> shards;
  index_t val_windows = -1;
  double val_fraction = 0;
};

bool is_shard(const std::string& p) { return fs::path(p).extension() == ".bin"; }
bool is_manifest(const std::string& p) { return fs::path(p).extension() == ".json"; }

/// Turns --data / --val-data into shard lists, tokenizing text and JSON-lines into the run directory.
std::vector<std::string> materialise(const std::vector<std::string>& inputs, const std::string& prefix,
                                     const std::string& tokenizer_path, const po::variables_map& vm,
                                     index_t* tokens_out) {
  std::vector<std::string> shards;
  std::vector<data::CorpusInput> text;
  index_t tokens = 0;
  for (const auto& in : inputs) {
    DISTILX_REQUIRE(io_error, fs::exists(in), "data file '", in, "' does not exist");
    if (is_shard(in)) {
      shards.push_back(in);
      tokens += data::ShardReader(in).size();
    } else if (is_manifest(in)) {
      const auto m = data::read_manifest(in);
      shards.insert(shards.end(), m.shard_paths.begin(), m.shard_paths.end());
      tokens += m.total_tokens;
    } else {
      text.emplace_back(in);
    }
  }
  if (!text.empty()) {
    DISTILX_REQUIRE(io_error, !tokenizer_path.empty() && fs::exists(tokenizer_path), "text data needs a tokenizer: ",
                    tokenizer_path.empty() ? std::string("none given") : tokenizer_path + " does not exist",
                    " (put tokenizer.json in the teacher directory, pass --tokenizer FILE, or give token shards)");
    const Tokenizer tok = Tokenizer::from_file(tokenizer_path);
    data::CorpusOptions co;
    co.output_prefix = prefix;
    co.threads = 0;
    const std::string split = vm["text-split"].as<std::string>();
    co.text_split = split == "file" ? data::TextSplit::file : split == "line" ? data::TextSplit::line : data::TextSplit::paragraph;
    DISTILX_REQUIRE(config_error, split == "file" || split == "line" || split == "paragraph",
                    "--text-split must be file, paragraph or line (got '", split, "')");
    co.json_field = vm["json-field"].as<std::string>();
    const data::CorpusManifest m = data::build_corpus(text, tok, co);
    shards.insert(shards.end(), m.shard_paths.begin(), m.shard_paths.end());
    tokens += m.total_tokens;
  }
  if (tokens_out) *tokens_out = tokens;
  return shards;
}

template <class Teacher>
StudentConfig student_config_from_options(const po::variables_map& vm, const Teacher& t) {
  StudentFromTeacher rule;
  const std::string blocks = vm["blocks"].as<std::string>(), heads = vm["heads"].as<std::string>();
  auto number = [](const std::string& s, const char* what) {
    char* end = nullptr;
    const long v = std::strtol(s.c_str(), &end, 10);
    if (!end || *end || v <= 0) throw UsageError(std::string("--") + what + " must be a positive number or a rule, got '" + s + "'");
    return index_t(v);
  };
  if (blocks == "same" || blocks == "half") rule.blocks = blocks;
  else rule.blocks = "explicit", rule.num_blocks = number(blocks, "blocks");
  if (heads == "teacher") rule.heads = "teacher";
  else rule.heads = "explicit", rule.num_heads = number(heads, "heads");
  rule.pattern = vm["pattern"].as<std::string>();
  rule.base.mlstm_qkv_proj_blocksize = vm["qkv-blocksize"].as<long>();
  rule.base.mlstm_proj_factor = vm["mlstm-factor"].as<double>();
  rule.base.ffn_proj_factor = vm["ffn-factor"].as<double>();
  rule.base.mlstm_conv1d_kernel_size = rule.base.slstm_conv1d_kernel_size = vm["conv"].as<long>();
  rule.base.mlstm_chunk_size = vm["chunk"].as<long>();
  rule.base.context_length = vm["seq"].as<long>();
  return student_config_for_teacher(t.vocab_size(), t.hidden_size(), t.num_layers(), t.config().num_attention_heads,
                                    rule);
}

DistillerConfig distiller_config_from_options(const po::variables_map& vm) {
  DistillerConfig c;
  c.max_steps = vm["steps"].as<long>();
  c.grad_accum = vm["grad-accum"].as<long>();
  c.clip_norm = vm["clip"].as<double>();
  c.adamw.lr = vm["lr"].as<double>();
  c.adamw.weight_decay = vm["weight-decay"].as<double>();
  const double wu = vm["warmup"].as<double>();
  const index_t warm = wu < 1 ? index_t(wu * double(c.max_steps)) : index_t(wu);
  c.lr = LrScheduleConfig{LrScheduleKind::cosine, c.adamw.lr, std::min(warm, c.max_steps), c.max_steps,
                          vm["min-lr-ratio"].as<double>()};
  auto& L = c.loss;
  L.divergence = parse_divergence(vm["divergence"].as<std::string>());
  L.beta = vm["beta"].as<double>();
  L.alignment = parse_alignment_policy(vm["alignment"].as<std::string>());
  const std::string sched = vm["schedule"].as<std::string>();
  const double delta = vm["delta"].as<double>();
  if (sched == "delta") {
    L.tau = DeltaSchedule{vm["tau"].as<double>(), vm["tau-floor"].as<double>(), delta};
    L.kl_weight = DeltaSchedule{vm["kl-weight"].as<double>(), vm["kl-floor"].as<double>(), delta};
    L.alignment_weight = DeltaSchedule{vm["al-weight"].as<double>(), vm["al-floor"].as<double>(), delta};
  } else if (sched == "fixed") {
    L.tau = FixedSchedule{vm["tau"].as<double>()};
    L.kl_weight = FixedSchedule{vm["kl-weight"].as<double>()};
    L.alignment_weight = FixedSchedule{vm["al-weight"].as<double>()};
  } else {
    throw UsageError("--schedule must be delta or fixed, got '" + sched + "'");
  }
  L.additive_alignment_weight = vm["additive-alignment"].as<bool>();
  c.eval_every = vm["eval-every"].as<long>();
  c.eval_batches = vm["eval-batches"].as<long>();
  c.checkpoint_every = vm["checkpoint-every"].as<long>();
  c.keep_checkpoints = vm["keep"].as<long>();
  c.run_dir = vm["out"].as<std::string>();
  return c;
}

/// NX-AI xLSTMLMModelConfig (nested dataclasses) for an exported student.
nlohmann::json nx_ai_config(const StudentConfig& c) {
  return {{"vocab_size", c.vocab_size},
          {"embedding_dim", c.embedding_dim},
          {"num_blocks", c.num_blocks},
          {"context_length", c.context_length},
          {"tie_weights", c.tie_weights},
          {"add_post_blocks_norm", c.add_post_blocks_norm},
          {"bias", false},
          {"dropout", 0.0},
          {"weight_decay_on_embedding", false},
          {"add_embedding_dropout", false},
          {"slstm_at", c.slstm_at},
          {"mlstm_block",
           {{"mlstm",
             {{"conv1d_kernel_size", c.mlstm_conv1d_kernel_size}, {"qkv_proj_blocksize", c.mlstm_qkv_proj_blocksize},
              {"num_heads", c.mlstm_num_heads}, {"proj_factor", c.mlstm_proj_factor},
              {"round_proj_up_dim_up", true}, {"round_proj_up_to_multiple_of", 64}}}}},
          {"slstm_block",
           {{"slstm",
             {{"backend", "cuda"}, {"num_heads", c.slstm_num_heads}, {"conv1d_kernel_size", c.slstm_conv1d_kernel_size},
              {"bias_init", c.slstm_bias_init}, {"recurrent_weight_init", "zeros"}}},
            {"feedforward", {{"proj_factor", c.ffn_proj_factor}, {"act_fn", c.ffn_act}}}}}};
}

StudentConfig from_nx_ai_config(const nlohmann::json& j) {
  try {
    StudentConfig c;
    c.vocab_size = j.at("vocab_size");
    c.embedding_dim = j.at("embedding_dim");
    c.num_blocks = j.at("num_blocks");
    c.context_length = j.value("context_length", index_t(-1));
    c.tie_weights = j.value("tie_weights", false);
    c.add_post_blocks_norm = j.value("add_post_blocks_norm", true);
    c.slstm_at = j.value("slstm_at", std::vector<index_t>{});
    if (j.contains("mlstm_block") && !j["mlstm_block"].is_null()) {
      const auto& m = j["mlstm_block"]["mlstm"];
      c.mlstm_conv1d_kernel_size = m.value("conv1d_kernel_size", index_t(4));
      c.mlstm_qkv_proj_blocksize = m.value("qkv_proj_blocksize", index_t(4));
      c.mlstm_num_heads = m.value("num_heads", index_t(4));
      c.mlstm_proj_factor = m.value("proj_factor", 2.0);
    }
    if (j.contains("slstm_block") && !j["slstm_block"].is_null()) {
      const auto& s = j["slstm_block"]["slstm"];
      c.slstm_num_heads = s.value("num_heads", index_t(4));
      c.slstm_conv1d_kernel_size = s.value("conv1d_kernel_size", index_t(4));
      c.slstm_bias_init = s.value("bias_init", std::string("powerlaw_blockdependent"));
      const auto& ff = j["slstm_block"].value("feedforward", nlohmann::json::object());
      c.ffn_proj_factor = ff.value("proj_factor", 1.3);
      c.ffn_act = ff.value("act_fn", std::string("gelu"));
    }
    c.validate();
    return c;
  } catch (const nlohmann::json::exception& e) {
    throw config_error(std::string("NX-AI xLSTMLMModelConfig JSON is malformed: ") + e.what());
  }
}

void write_text_atomic(const std::string& path, const std::string& text) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream o(tmp, std::ios::trunc);
    o << text;
    o.flush();
    DISTILX_REQUIRE(io_error, o.good(), "cannot write ", tmp, " (disk full?)");
  }
  fs::rename(tmp, path);
}

/// Saves the student as safetensors (NX-AI names) plus <name>.config.json in NX-AI's format.
template <class S>
void export_student(const S& s, const std::string& path) {
  io::save_student(s, path);
  std::string cfg_path = path;
  if (cfg_path.size() > 12 && cfg_path.substr(cfg_path.size() - 12) == ".safetensors") cfg_path.resize(cfg_path.size() - 12);
  write_text_atomic(cfg_path + ".config.json", nx_ai_config(s.config()).dump(2) + "\n");
}

struct EvalTotals {
  double s_ce = 0, t_ce = 0, kl = 0, top1 = 0;
  index_t n = 0;
};

/// Student vs teacher on every window of the given shards (no training split).
EvalTotals evaluate_windows(StudentF& s, TeacherF& t, const std::vector<std::string>& shards, index_t B, index_t T,
                            index_t max_batches) {
  data::LoaderOptions o;
  o.seq_len = T;
  o.batch_size = 1;
  o.vocab_size = static_cast<std::int32_t>(t.vocab_size());
  data::TokenLoader loader(shards, o);
  const index_t W = loader.num_windows();
  DISTILX_REQUIRE(error, W > 0, "the evaluation data holds fewer than ", T + 1, " tokens");
  DeltaDistillationLoss<F> loss(DistillationLossConfig{});
  VocabLoss<F> tce;
  std::vector<std::int32_t> in, tg;
  std::vector<Tensor<F>> hs;
  EvalTotals tot;
  index_t batches = 0;
  for (index_t w0 = 0; w0 < W && (max_batches <= 0 || batches < max_batches); w0 += B, ++batches) {
    const index_t b = std::min(B, W - w0);
    in.resize(static_cast<std::size_t>(b * T));
    tg.resize(in.size());
    for (index_t i = 0; i < b; ++i) loader.read_window(w0 + i, in.data() + i * T, tg.data() + i * T);
    t.forward(in.data(), b, T, nullptr, nullptr, &hs);
    s.forward(in.data(), b, T);
    DistillationInputs<F> di;
    di.vocab = {s.hidden(), s.head(), hs.back().data(), t.lm_head().data(), nullptr, tg.data(), nullptr,
                b * T,      s.config().embedding_dim, t.hidden_size(), t.vocab_size()};
    const auto m = loss.compute(di, LossWeights{1.0, 1.0, 0.0, 1.0}, DistillationGrads<F>{}, false);
    VocabLossInputs<F> ti{hs.back().data(), t.lm_head().data(), nullptr, nullptr, nullptr, tg.data(), nullptr,
                          b * T, t.hidden_size(), t.hidden_size(), t.vocab_size()};
    const auto tr = tce.compute(ti, 1.0, 0.0, 1.0, nullptr, false);
    tot.s_ce += m.ce * double(b * T);
    tot.t_ce += tr.ce * double(b * T);
    tot.kl += m.kl * double(b * T);
    tot.top1 += m.top1 * double(b * T);
    tot.n += b * T;
  }
  return tot;
}

struct DistillOutcome {
  EvalReport eval;
  bool has_eval = false;
  std::string student_path;
  double seconds = 0;
  bool interrupted = false;
  bool root = true;  // false on the other ranks of a multi-GPU run (they print nothing)
};

/// The whole `distill` job on one backend; shared by the subcommand and the demo.
template <class Backend>
DistillOutcome run_distill_on(const po::variables_map& vm, const std::string& label, DistillerConfig dc,
                              bool quiet_header) {
  using TeacherB = LlamaTeacher<F, Backend>;
  using StudentB = Student<F, Backend>;
  const auto t_start = std::chrono::steady_clock::now();
  if (!vm.count("teacher")) throw UsageError("distill needs --teacher DIR");
  if (!vm.count("out")) throw UsageError("distill needs --out RUN_DIR");
  const std::string teacher_dir = vm["teacher"].as<std::string>(), out = vm["out"].as<std::string>();
  const bool resume = vm["resume"].as<bool>();
  DISTILX_REQUIRE(io_error, fs::is_directory(teacher_dir), "teacher directory '", teacher_dir,
                  "' does not exist (expected config.json, *.safetensors and tokenizer.json)");
  const std::string split = vm["text-split"].as<std::string>(), pattern = vm["pattern"].as<std::string>();
  if (split != "file" && split != "paragraph" && split != "line")
    throw UsageError("--text-split must be file, paragraph or line (got '" + split + "')");
  if (pattern != "alternate_slstm_first" && pattern != "alternate_mlstm_first" && pattern != "mlstm_only")
    throw UsageError("--pattern must be alternate_slstm_first, alternate_mlstm_first or mlstm_only (got '" + pattern + "')");
  // Data parallelism: launched by --gpus (launch_local), mpirun, srun or RANK/WORLD_SIZE.
  bool root = true;
#ifdef DISTILX_APP_NCCL
  std::shared_ptr<parallel::Communicator> comm;
  if constexpr (std::is_same_v<Backend, distilx::cuda>)
    if (parallel::detect_env().world_size > 1) comm = parallel::Communicator::from_environment();
  root = !comm || comm->rank() == 0;
  auto barrier = [&](const char* what) {  // every rank waits for the root's file work
    if (!comm) return;
    Buffer<float, distilx::cuda> one(1);
    comm->all_reduce(one.data(), one.data(), 1, ncclSum, cuda_backend::current_stream());
    comm->synchronize(what);
  };
#else
  auto barrier = [](const char*) {};
#endif
  TeacherB teacher = TeacherB::from_pretrained(teacher_dir);
  const std::string tok_path = vm.count("tokenizer") ? vm["tokenizer"].as<std::string>()
                                                     : (fs::path(teacher_dir) / "tokenizer.json").string();

  // Run directory: refuse to mix two runs.
  const std::string run_json = (fs::path(out) / "run.json").string();
  const bool has_ckpt = !io::list_checkpoints(out).empty();
  if (has_ckpt && !resume)
    throw error("run directory '" + out + "' already holds a run; pass --resume to continue it, or choose another --out");
  if (resume && !has_ckpt) throw error("nothing to resume in '" + out + "' (no checkpoint); start it again without --resume");
  if (root && !resume && fs::exists(run_json)) {  // a run that stopped before its first checkpoint: start over
    fs::remove(run_json);
    fs::remove_all(fs::path(out) / "data");
  }
  if (root) fs::create_directories(out);
  barrier("run directory set-up");
  if (!vm.count("data") && !(resume && fs::exists(fs::path(out) / "data")))
    throw UsageError("distill needs --data FILE... (text, jsonl, .bin shards or a manifest .json)");

  // Data: text is tokenized once into the run directory; the resolved shard lists (absolute
  // paths, given shards included) are recorded in data/shards.json and reused on resume.
  DataPlan plan;
  const fs::path data_dir = fs::path(out) / "data";
  const std::string shard_list = (data_dir / "shards.json").string();
  index_t val_tokens = 0;
  if (!root) barrier("tokenizing the data on rank 0");  // the root tokenizes; the others read its list
  if ((resume || !root) && fs::exists(shard_list)) {
    std::ifstream in(shard_list);
    nlohmann::json j;
    in >> j;
    plan.shards = j.at("train").get<std::vector<std::string>>();
    const auto v = j.at("val").get<std::vector<std::string>>();
    plan.shards.insert(plan.shards.end(), v.begin(), v.end());
    val_tokens = j.at("val_tokens").get<index_t>();
  } else {
    fs::create_directories(data_dir);
    const auto absolute_all = [](std::vector<std::string> v) {
      for (auto& p : v) p = fs::absolute(p).string();
      return v;
    };
    plan.shards = absolute_all(materialise(vm["data"].as<std::vector<std::string>>(), (data_dir / "train").string(),
                                           tok_path, vm, nullptr));
    std::vector<std::string> v;
    if (vm.count("val-data"))
      v = absolute_all(materialise(vm["val-data"].as<std::vector<std::string>>(), (data_dir / "val").string(), tok_path,
                                   vm, &val_tokens));
    write_text_atomic(shard_list, nlohmann::json{{"train", plan.shards}, {"val", v}, {"val_tokens", val_tokens}}.dump(2) + "\n");
    plan.shards.insert(plan.shards.end(), v.begin(), v.end());
  }
  if (root) barrier("tokenizing the data on rank 0");
  data::LoaderOptions lo;
  lo.seq_len = vm["seq"].as<long>();
  lo.batch_size = vm["batch"].as<long>();
  lo.seed = vm["seed"].as<unsigned long>();
  lo.vocab_size = static_cast<std::int32_t>(teacher.vocab_size());
  lo.check_tokens_on_open = true;
#ifdef DISTILX_APP_NCCL
  if (comm) {
    lo.rank = comm->rank();
    lo.world_size = comm->world_size();
  }
#endif
  if (val_tokens > 0) lo.val_windows = val_tokens / (lo.seq_len + 1);
  else lo.val_fraction = vm["val-fraction"].as<double>();
  data::TokenLoader loader(plan.shards, lo);

  StudentConfig sc = student_config_from_options(vm, teacher);
  StudentB student(sc);
  student.init(vm["seed"].as<unsigned long>());
  copy_frozen_from_teacher(student, teacher);
  dc.extra = {{"teacher", fs::absolute(teacher_dir).string()}};
  Distiller<StudentB, TeacherB> d(student, teacher, loader, dc);
  [[maybe_unused]] const std::string zero = vm["zero"].as<std::string>();  // checked by cmd_distill
#ifdef DISTILX_APP_NCCL
  if constexpr (std::is_same_v<Backend, distilx::cuda>) {
    if (comm) {
      parallel::DataParallelOptions po;
      po.mode = zero == "zero1" ? parallel::ShardingMode::zero1 : parallel::ShardingMode::replicate;
      po.adamw = dc.adamw;
      d.set_data_parallel(std::make_shared<parallel::NcclDataParallel<F>>(comm, student, po));
    }
  }
#endif
  if (!quiet_header && root) {
    const auto counts = StudentB::count(sc);
    std::fprintf(stderr,
                 "%s teacher %s: %s, %lld layers, d %lld, V %lld | student: %lld blocks (sLSTM at %zu of them), %lld "
                 "heads, %lld trainable / %lld total parameters | %lld train + %lld val windows of %ld tokens\n",
                 label.c_str(), teacher_dir.c_str(), teacher.config().architecture.c_str(),
                 (long long)teacher.num_layers(), (long long)teacher.hidden_size(), (long long)teacher.vocab_size(),
                 (long long)sc.num_blocks, sc.slstm_at.size(), (long long)sc.mlstm_num_heads,
                 (long long)counts.trainable, (long long)counts.total(), (long long)loader.num_train_windows(),
                 (long long)loader.num_val_windows(), (long)lo.seq_len);
  }
  if (resume) {
    const auto cks = io::list_checkpoints(out);
    DISTILX_REQUIRE(error, !cks.empty(), "no checkpoint in '", out, "' to resume from");
    d.resume(cks.back().second);
    if (root) {
      std::fprintf(stderr, "%s resumed from %s at step %lld\n", label.c_str(), cks.back().second.c_str(),
                   (long long)d.step_count());
      app::truncate_metrics(out, d.step_count());
    }
  } else if (root) {
    nlohmann::json rj = d.run_config();
    write_text_atomic(run_json, rj.dump(2) + "\n");
  }
  auto progress = std::make_shared<app::ProgressPrinter>(label, vm["log-every"].as<long>());
  d.add_callback(progress);
  d.add_callback(std::make_shared<app::MetricsWriter>(out, resume));
  d.train();
  DistillOutcome r;
  r.root = root;
  r.interrupted = app::interrupted().load();
  if (r.interrupted && root) {
    std::fprintf(stderr, "%s interrupted at step %lld: checkpoint saved in %s; continue with --resume\n", label.c_str(),
                 (long long)d.step_count(), out.c_str());
  }
  if (r.interrupted) return r;
  if (loader.val_batches() > 0) r.eval = d.last_eval_step() == d.step_count() ? d.last_eval() : d.evaluate(dc.eval_batches);
  r.has_eval = loader.val_batches() > 0;
  r.student_path = (fs::path(out) / "student.safetensors").string();
  if (root) export_student(student, r.student_path);
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t_start).count();
  return r;
}

DistillOutcome run_distill(const po::variables_map& vm, const std::string& label, bool quiet_header = false) {
  DistillerConfig dc;
  try {
    dc = distiller_config_from_options(vm);
  } catch (const config_error& e) {
    throw UsageError(e.what());
  }
  if (apply_device(vm, &dc)) {
#ifdef DISTILX_APP_CUDA
    return run_distill_on<distilx::cuda>(vm, label, dc, quiet_header);
#endif
  }
  return run_distill_on<cpu>(vm, label, dc, quiet_header);
}

const char* kDistillUsage =
    "Usage: distilx distill --teacher DIR --data FILE... --out RUN_DIR [options]\n"
    "Distils the teacher into an xLSTM student with the Δ-distillation loss (Distil-xLSTM).\n"
    "Defaults are the paper's: 6 blocks (sLSTM at 0, 2, 4), 16 heads, tau 2 -> 1, w_kl 0.2 -> 0.1.";

int cmd_distill(int argc, char** argv) {
  po::options_description desc;
  desc.add(common_options()).add(distill_options());
  const auto vm = parse(argc, argv, desc);
  if (help_requested(vm, desc, kDistillUsage)) return 0;
  if (vm.count("print-config")) {
    print_config(vm, desc);
    return 0;
  }
  apply_threads(vm);
  const int gpus = vm["gpus"].as<int>();
  if (gpus < 1) throw UsageError("--gpus must be >= 1 (got " + std::to_string(gpus) + ")");
  const std::string zero = vm["zero"].as<std::string>();
  if (zero != "replicate" && zero != "zero1") throw UsageError("--zero must be replicate or zero1 (got '" + zero + "')");
  if (gpus > 1) {
    if (vm["device"].as<std::string>() != "cuda") throw UsageError("--gpus " + std::to_string(gpus) + " needs --device cuda");
#ifdef DISTILX_APP_NCCL
    // The parent starts one worker per GPU (this program again, with RANK/WORLD_SIZE/LOCAL_RANK
    // set) and waits; the workers see is_launched_worker() and train.
    if (!parallel::is_launched_worker()) return parallel::launch_local(gpus, argc + 1, argv - 1);
#else
    throw error("--gpus needs a distilx built with NCCL (found with the CUDA toolkit; set NCCL_ROOT), see docs/distributed.md");
#endif
  }
  const DistillOutcome r = run_distill(vm, "[distill]");
  if (!r.root) return r.interrupted ? 130 : 0;
  if (r.interrupted) return 130;
  if (r.has_eval)
    std::printf("student: held-out perplexity %.3f (teacher %.3f), KL(t||s) %.4f, top-1 %.3f\n", r.eval.student_ppl,
                r.eval.teacher_ppl, r.eval.kl, r.eval.top1);
  else
    std::printf("no validation split (use --val-fraction or --val-data): no held-out evaluation\n");
  std::printf("saved %s (+ .config.json in NX-AI xLSTMLMModelConfig form); metrics in %s/metrics.csv\n",
              r.student_path.c_str(), vm["out"].as<std::string>().c_str());
  return 0;
}

// ---------------------------------------------------------------------------------------------
// eval, generate, tokenize, export, import, plot

StudentF load_student_file(const std::string& path) {
  DISTILX_REQUIRE(io_error, fs::exists(path), "student file '", path, "' does not exist");
  io::SafetensorsFile f(path);
  DISTILX_REQUIRE(io_error, f.metadata().count("config"), path,
                  " has no distilx config metadata; for an NX-AI checkpoint use `distilx import` first");
  StudentConfig c = nlohmann::json::parse(f.metadata().at("config")).get<StudentConfig>();
  StudentF s(c);
  io::load_student(s, path);
  return s;
}

int cmd_eval(int argc, char** argv) {
  po::options_description desc("eval options");
  desc.add(common_options());
  desc.add_options()("teacher", po::value<std::string>(), "teacher directory")(
      "student", po::value<std::string>(), "student .safetensors (from distill or export)")(
      "data", po::value<std::vector<std::string>>()->multitoken(), "evaluation data (.txt/.jsonl/.bin/.json)")(
      "tokenizer", po::value<std::string>(), "tokenizer.json (default: the teacher's)")(
      "text-split", po::value<std::string>()->default_value("paragraph"), "text files: file, paragraph or line")(
      "json-field", po::value<std::string>()->default_value("text"), "JSON-lines text field")(
      "seq", po::value<long>()->default_value(512), "tokens per window")(
      "batch", po::value<long>()->default_value(4), "windows per batch")(
      "max-batches", po::value<long>()->default_value(0), "stop after N batches (0: all)");
  const auto vm = parse(argc, argv, desc);
  if (help_requested(vm, desc, "Usage: distilx eval --teacher DIR --student FILE --data FILE...\n"
                                "Student and teacher perplexity side by side, KL(teacher||student) at tau 1, top-1 agreement."))
    return 0;
  if (vm.count("print-config")) return print_config(vm, desc), 0;
  if (!vm.count("teacher") || !vm.count("student") || !vm.count("data"))
    throw UsageError("eval needs --teacher DIR, --student FILE and --data FILE...");
  apply_threads(vm);
  const std::string tdir = vm["teacher"].as<std::string>();
  DISTILX_REQUIRE(io_error, fs::is_directory(tdir), "teacher directory '", tdir, "' does not exist");
  TeacherF teacher = TeacherF::from_pretrained(tdir);
  StudentF student = load_student_file(vm["student"].as<std::string>());
  const std::string tok = vm.count("tokenizer") ? vm["tokenizer"].as<std::string>() : (fs::path(tdir) / "tokenizer.json").string();
  const fs::path tmp = fs::temp_directory_path() / ("distilx_eval_" + std::to_string(::getpid()));
  struct Cleanup {
    fs::path p;
    ~Cleanup() {
      std::error_code ec;
      fs::remove_all(p, ec);
    }
  } cleanup{tmp};
  const auto shards = materialise(vm["data"].as<std::vector<std::string>>(), (tmp / "eval").string(), tok, vm, nullptr);
  const EvalTotals e = evaluate_windows(student, teacher, shards, vm["batch"].as<long>(), vm["seq"].as<long>(),
                                        vm["max-batches"].as<long>());
  std::printf("tokens evaluated      %lld\n", (long long)e.n);
  std::printf("student perplexity    %.4f\n", std::exp(e.s_ce / double(e.n)));
  std::printf("teacher perplexity    %.4f\n", std::exp(e.t_ce / double(e.n)));
  std::printf("KL(teacher||student)  %.5f\n", e.kl / double(e.n));
  std::printf("top-1 agreement       %.4f\n", e.top1 / double(e.n));
  return 0;
}

int cmd_generate(int argc, char** argv) {
  po::options_description desc("generate options");
  desc.add(common_options());
  desc.add_options()("student", po::value<std::string>(), "student .safetensors")(
      "tokenizer", po::value<std::string>(), "tokenizer.json")("prompt", po::value<std::string>()->default_value(""),
                                                               "prompt text")(
      "max-tokens", po::value<long>()->default_value(100), "tokens to generate")(
      "temperature", po::value<double>()->default_value(1.0, "1.0"), "sampling temperature (0: greedy)")(
      "top-k", po::value<long>()->default_value(0), "keep the k most likely tokens (0: all)")(
      "top-p", po::value<double>()->default_value(1.0, "1.0"), "nucleus sampling mass")(
      "greedy", po::bool_switch(), "argmax decoding")("seed", po::value<unsigned long>()->default_value(0), "sampling seed")(
      "stop-at-eos", po::value<bool>()->default_value(true), "stop at the tokenizer's end-of-text token");
  const auto vm = parse(argc, argv, desc);
  if (help_requested(vm, desc, "Usage: distilx generate --student FILE --tokenizer FILE --prompt TEXT [options]\n"
                                "Streams text from the student using its recurrent state (memory constant in length)."))
    return 0;
  if (vm.count("print-config")) return print_config(vm, desc), 0;
  if (!vm.count("student") || !vm.count("tokenizer")) throw UsageError("generate needs --student FILE and --tokenizer FILE");
  apply_threads(vm);
  StudentF s = load_student_file(vm["student"].as<std::string>());
  const Tokenizer tok = Tokenizer::from_file(vm["tokenizer"].as<std::string>());
  std::vector<std::int32_t> ids = tok.encode(vm["prompt"].as<std::string>());
  const auto eos = tok.eos_id();
  if (ids.empty()) ids.push_back(eos ? *eos : 0);
  const index_t V = s.config().vocab_size;
  for (auto id : ids)
    DISTILX_REQUIRE(error, id >= 0 && id < V, "prompt token ", id, " is outside the student's vocabulary (", V,
                    "); is this the teacher's tokenizer?");
  auto st = s.make_state(1);
  std::vector<F> logits(static_cast<std::size_t>(V));
  for (auto id : ids) s.step(&id, st, logits.data());
  Rng rng(vm["seed"].as<unsigned long>());
  const double temp = vm["greedy"].as<bool>() ? 0.0 : vm["temperature"].as<double>();
  const long top_k = vm["top-k"].as<long>();
  const double top_p = vm["top-p"].as<double>();
  std::vector<std::int32_t> gen;
  std::string printed;
  std::cout << vm["prompt"].as<std::string>() << std::flush;
  std::vector<std::pair<double, std::int32_t>> cand;
  for (long n = 0; n < vm["max-tokens"].as<long>(); ++n) {
    std::int32_t next = 0;
    if (temp <= 0) {
      next = static_cast<std::int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
    } else {
      cand.clear();
      for (index_t v = 0; v < V; ++v) cand.emplace_back(double(logits[v]) / temp, static_cast<std::int32_t>(v));
      std::sort(cand.begin(), cand.end(), [](auto& a, auto& b) { return a.first > b.first || (a.first == b.first && a.second < b.second); });
      if (top_k > 0 && top_k < V) cand.resize(static_cast<std::size_t>(top_k));
      const double mx = cand.front().first;
      double sum = 0;
      for (auto& c : cand) sum += (c.first = std::exp(c.first - mx));
      double keep = 0;
      std::size_t k = 0;
      while (k < cand.size() && keep < top_p * sum) keep += cand[k++].first;
      cand.resize(std::max<std::size_t>(1, k));
      double u = rng.uniform() * keep, acc = 0;
      next = cand.back().second;
      for (auto& c : cand)
        if ((acc += c.first) > u) {
          next = c.second;
          break;
        }
    }
    if (eos && next == *eos && vm["stop-at-eos"].as<bool>()) break;
    gen.push_back(next);
    const std::string text = tok.decode(gen);
    // Hold back an incomplete UTF-8 sequence (decoded as U+FFFD) until its last byte arrives.
    if (text.size() >= 3 && text.compare(text.size() - 3, 3, "\xEF\xBF\xBD") == 0 && n + 1 < vm["max-tokens"].as<long>()) {
    } else if (text.size() > printed.size()) {
      std::cout << text.substr(printed.size()) << std::flush;
      printed = text;
    }
    s.step(&next, st, logits.data());
  }
  std::cout << "\n";
  return 0;
}

int cmd_tokenize(int argc, char** argv) {
  po::options_description desc("tokenize options");
  desc.add(common_options());
  desc.add_options()("tokenizer", po::value<std::string>(), "tokenizer.json")(
      "out", po::value<std::string>(), "output prefix: PREFIX_000000.bin ... and PREFIX.json")(
      "input", po::value<std::vector<std::string>>()->multitoken(), "text / jsonl files")(
      "text-split", po::value<std::string>()->default_value("paragraph"), "text files: file, paragraph or line")(
      "json-field", po::value<std::string>()->default_value("text"), "JSON-lines text field")(
      "shard-tokens", po::value<long>()->default_value(100000000), "tokens per shard");
  po::positional_options_description pos;
  pos.add("input", -1);
  const auto vm = parse(argc, argv, desc, &pos);
  if (help_requested(vm, desc, "Usage: distilx tokenize --tokenizer FILE --out PREFIX FILE...\n"
                                "Tokenizes text and JSON-lines into llm.c-style token shards (uint32), in parallel."))
    return 0;
  if (vm.count("print-config")) return print_config(vm, desc), 0;
  if (!vm.count("tokenizer") || !vm.count("out") || !vm.count("input"))
    throw UsageError("tokenize needs --tokenizer FILE, --out PREFIX and input files");
  const Tokenizer tok = Tokenizer::from_file(vm["tokenizer"].as<std::string>());
  data::CorpusOptions co;
  co.output_prefix = vm["out"].as<std::string>();
  co.threads = vm["threads"].as<int>();
  co.shard_tokens = vm["shard-tokens"].as<long>();
  const std::string split = vm["text-split"].as<std::string>();
  if (split != "file" && split != "paragraph" && split != "line") throw UsageError("--text-split must be file, paragraph or line");
  co.text_split = split == "file" ? data::TextSplit::file : split == "line" ? data::TextSplit::line : data::TextSplit::paragraph;
  co.json_field = vm["json-field"].as<std::string>();
  std::vector<data::CorpusInput> in;
  for (const auto& p : vm["input"].as<std::vector<std::string>>()) in.emplace_back(p);
  const auto t0 = std::chrono::steady_clock::now();
  const auto m = data::build_corpus(in, tok, co);
  const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("%lld documents, %lld tokens in %zu shard(s), %.2f s; manifest %s.json\n", (long long)m.documents,
              (long long)m.total_tokens, m.shard_paths.size(), dt, co.output_prefix.c_str());
  return 0;
}

int cmd_export(int argc, char** argv) {
  po::options_description desc("export options");
  desc.add(common_options());
  desc.add_options()("run", po::value<std::string>(), "run directory (uses its newest checkpoint)")(
      "checkpoint", po::value<std::string>(), "a checkpoint file (instead of --run)")(
      "teacher", po::value<std::string>(), "teacher directory for the frozen embedding/head (default: the run's)")(
      "out", po::value<std::string>(), "output .safetensors (NX-AI xLSTMLMModel names) + .config.json");
  const auto vm = parse(argc, argv, desc);
  if (help_requested(vm, desc, "Usage: distilx export (--run DIR | --checkpoint FILE) --out FILE.safetensors\n"
                                "Writes the student with NX-AI xLSTMLMModel state_dict names and an xLSTMLMModelConfig JSON."))
    return 0;
  if (vm.count("print-config")) return print_config(vm, desc), 0;
  if (!vm.count("out") || (!vm.count("run") && !vm.count("checkpoint")))
    throw UsageError("export needs --out FILE and --run DIR or --checkpoint FILE");
  std::string ck_path;
  if (vm.count("checkpoint")) ck_path = vm["checkpoint"].as<std::string>();
  else {
    const auto cks = io::list_checkpoints(vm["run"].as<std::string>());
    DISTILX_REQUIRE(error, !cks.empty(), "no checkpoint in run directory '", vm["run"].as<std::string>(), "'");
    ck_path = cks.back().second;
  }
  const io::Checkpoint ck = io::load_checkpoint(ck_path);
  const StudentConfig c = ck.meta.at("config").at("student").get<StudentConfig>();
  DISTILX_REQUIRE(io_error, ck.meta.value("scalar_type", "") == "f32", ck_path, " does not hold float32 weights");
  StudentF s(c);
  ck.get("params", s.params(), static_cast<std::size_t>(s.flat_size()), ck_path);
  const std::string tdir = vm.count("teacher") ? vm["teacher"].as<std::string>()
                                               : ck.meta["config"]["distiller"]["extra"].value("teacher", std::string());
  DISTILX_REQUIRE(io_error, !tdir.empty() && fs::is_directory(tdir), "the frozen embedding and head come from the teacher; ",
                  "teacher directory '", tdir, "' not found (pass --teacher DIR)");
  TeacherF t = TeacherF::from_pretrained(tdir);
  copy_frozen_from_teacher(s, t);
  export_student(s, vm["out"].as<std::string>());
  std::printf("exported step %lld of %s to %s\n", (long long)ck.meta.at("step").get<index_t>(), ck_path.c_str(),
              vm["out"].as<std::string>().c_str());
  return 0;
}

int cmd_import(int argc, char** argv) {
  po::options_description desc("import options");
  desc.add(common_options());
  desc.add_options()("in", po::value<std::string>(), "NX-AI xLSTMLMModel .safetensors (any sLSTM layout, any Distil-xLSTM key version)")(
      "model-config", po::value<std::string>(), "its xLSTMLMModelConfig JSON (default: <in>.config.json)")(
      "out", po::value<std::string>(), "distilx student .safetensors");
  const auto vm = parse(argc, argv, desc);
  if (help_requested(vm, desc, "Usage: distilx import --in FILE.safetensors [--model-config FILE.json] --out FILE\n"
                                "Reads an NX-AI xLSTMLMModel checkpoint into a distilx student file."))
    return 0;
  if (vm.count("print-config")) return print_config(vm, desc), 0;
  if (!vm.count("in") || !vm.count("out")) throw UsageError("import needs --in FILE and --out FILE");
  std::string in = vm["in"].as<std::string>(), cfg_path;
  if (vm.count("model-config")) cfg_path = vm["model-config"].as<std::string>();
  else {
    cfg_path = in;
    if (cfg_path.size() > 12 && cfg_path.substr(cfg_path.size() - 12) == ".safetensors") cfg_path.resize(cfg_path.size() - 12);
    cfg_path += ".config.json";
  }
  std::ifstream cf(cfg_path);
  DISTILX_REQUIRE(io_error, cf.good(), "model config '", cfg_path, "' not found (pass --model-config FILE)");
  nlohmann::json j;
  try {
    cf >> j;
  } catch (const std::exception& e) {
    throw io_error(cfg_path + " is not valid JSON: " + e.what());
  }
  StudentF s(from_nx_ai_config(j));
  io::load_student(s, in);
  io::save_student(s, vm["out"].as<std::string>());
  std::printf("imported %s (%lld trainable parameters) to %s\n", in.c_str(), (long long)s.layout().count(),
              vm["out"].as<std::string>().c_str());
  return 0;
}

/// <prefix>/share/distilx next to <prefix>/bin/distilx, wherever the package was installed.
std::string exe_share_dir() {
  std::error_code ec;
  const fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  if (ec) return "";
  return (exe.parent_path().parent_path() / "share" / "distilx").string();
}

std::string share_file(const std::string& name) {
  for (const std::string dir : {exe_share_dir(), std::string(DISTILX_SHARE_DIR), std::string(DISTILX_SOURCE_SCRIPTS)})
    if (!dir.empty() && fs::exists(fs::path(dir) / name)) return (fs::path(dir) / name).string();
  return "";
}

int run_plot(const std::string& run_dir, const std::string& extra = "") {
  const std::string script = share_file("plot_metrics.py");
  DISTILX_REQUIRE(io_error, !script.empty(), "plot_metrics.py not found (reinstall distilx)");
  // Prefer the system interpreter, where Debian's python3-matplotlib lives.
  const std::string py = fs::exists("/usr/bin/python3") ? "/usr/bin/python3" : "python3";
  const std::string cmd = py + " '" + script + "' '" + run_dir + "'" + extra;
  return std::system(cmd.c_str());
}

int cmd_plot(int argc, char** argv) {
  po::options_description desc("plot options");
  desc.add(common_options());
  desc.add_options()("run", po::value<std::vector<std::string>>()->multitoken(), "run directories (overlaid)")(
      "out", po::value<std::string>(), "output directory (default: the first run's)");
  po::positional_options_description pos;
  pos.add("run", -1);
  const auto vm = parse(argc, argv, desc, &pos);
  if (help_requested(vm, desc, "Usage: distilx plot RUN_DIR... [--out DIR]\n"
                                "PNG curves of loss terms, perplexity and schedules from metrics.csv (matplotlib)."))
    return 0;
  if (vm.count("print-config")) return print_config(vm, desc), 0;
  if (!vm.count("run")) throw UsageError("plot needs a run directory");
  std::string args;
  const auto runs = vm["run"].as<std::vector<std::string>>();
  for (std::size_t i = 1; i < runs.size(); ++i) args += " '" + runs[i] + "'";
  if (vm.count("out")) args += " --out '" + vm["out"].as<std::string>() + "'";
  const int rc = run_plot(runs.front(), args);
  if (rc != 0) throw error("the plot script failed (is python3-matplotlib installed? scripts/setup installs it)");
  return 0;
}

// ---------------------------------------------------------------------------------------------
// The embedded demo

std::string demo_dir() {
  if (const char* e = std::getenv("DISTILX_DEMO_DIR")) return e;
  for (const std::string d : {exe_share_dir() + "/demo", std::string(DISTILX_DEMO_DIR), std::string(DISTILX_SHARE_DIR) + "/demo"})
    if (!d.empty() && fs::exists(fs::path(d) / "teacher" / "config.json")) return d;
  throw io_error("demo assets not found (set DISTILX_DEMO_DIR to the folder with teacher/ and data/)");
}

int cmd_demo(int argc, char** argv) {
  po::options_description desc("demo options");
  desc.add(common_options());
  desc.add_options()("out", po::value<std::string>()->default_value("distilx-demo"), "demo output directory")(
      "steps", po::value<long>()->default_value(250), "optimizer steps per student")(
      "skip-baseline", po::bool_switch(), "do not train the CE-only comparison student")(
      "device", po::value<std::string>()->default_value("cpu"), "cpu or cuda")(
      "precision", po::value<std::string>()->default_value("auto"), "GPU math: auto (= bf16), bf16, fp16, tf32 or fp32");
  const auto vm = parse(argc, argv, desc);
  if (help_requested(vm, desc, "Usage: distilx [demo] [--steps N] [--out DIR]\n"
                                "Distils the bundled teacher (a small Qwen2 trained on the King James Bible) into an\n"
                                "xLSTM student on the CPU, trains a CE-only student with the same budget, and compares."))
    return 0;
  if (vm.count("print-config")) return print_config(vm, desc), 0;
  apply_threads(vm);
  const std::string assets = demo_dir(), out = vm["out"].as<std::string>();
  const std::string device = vm["device"].as<std::string>(), precision = vm["precision"].as<std::string>();
  apply_device(vm, nullptr);  // usage errors before any work
  const long steps = vm["steps"].as<long>();
  if (fs::exists(out)) {
    DISTILX_REQUIRE(error, fs::exists(fs::path(out) / ".distilx-demo"), "'", out,
                    "' exists and is not a distilx demo directory; pass --out DIR");
    fs::remove_all(out);
  }
  fs::create_directories(out);
  std::ofstream(fs::path(out) / ".distilx-demo") << "created by distilx demo\n";
  std::fprintf(stderr,
               "distilx demo: Δ-distillation of a Qwen2 teacher (4 layers, d 192, trained on the King James Bible)\n"
               "into a 4-block xLSTM student on the %s, then a CE-only student with the same budget.\n\n",
               device == "cuda" ? "GPU" : "CPU");
  auto student_args = [&](const std::string& run, bool ce_only) {
    std::vector<std::string> a = {"distilx",
                                  "--teacher", (fs::path(assets) / "teacher").string(),
                                  "--data", (fs::path(assets) / "data" / "train.txt").string(),
                                  "--val-data", (fs::path(assets) / "data" / "heldout.txt").string(),
                                  "--out", (fs::path(out) / run).string(),
                                  "--steps", std::to_string(steps), "--batch", "8", "--seq", "128", "--grad-accum", "1",
                                  "--lr", "3e-3", "--warmup", "0.05", "--min-lr-ratio", "0.1", "--weight-decay", "0.01",
                                  "--blocks", "4", "--heads", "4", "--qkv-blocksize", "16", "--ffn-factor", "1.3",
                                  "--eval-batches", "0", "--checkpoint-every", "0", "--keep", "1",
                                  "--log-every", "5", "--seed", "7", "--delta", "0.05",
                                  "--device", device, "--precision", precision};
    if (ce_only) a.insert(a.end(), {"--schedule", "fixed", "--kl-weight", "0", "--alignment", "none"});
    return a;
  };
  po::options_description ddesc;
  ddesc.add(common_options()).add(distill_options());
  auto run = [&](const std::string& name, bool ce_only) {
    auto a = student_args(name, ce_only);
    std::vector<char*> av;
    for (auto& s : a) av.push_back(s.data());
    const auto dvm = parse(static_cast<int>(av.size()), av.data(), ddesc);
    return run_distill(dvm, ce_only ? "[ce-only]" : "[distill]");
  };
  const DistillOutcome distilled = run("distilled", false);
  if (distilled.interrupted) {
    std::fprintf(stderr, "demo interrupted; run `distilx` again to start it over\n");
    return 130;
  }
  DistillOutcome baseline;
  const bool base = !vm["skip-baseline"].as<bool>();
  if (base) {
    baseline = run("ce_only", true);
    if (baseline.interrupted) return 130;
  }
  std::printf("\nHeld-out perplexity on chapters the teacher never trained on (%lld tokens):\n",
              (long long)distilled.eval.tokens);
  std::printf("  %-38s %10s %14s %7s %7s\n", "model", "perplexity", "KL(teacher||.)", "top-1", "time");
  std::printf("  %-38s %10.2f %14s %7s %7s\n", "teacher (Qwen2, 2.0M params)", distilled.eval.teacher_ppl, "-", "-", "-");
  std::printf("  %-38s %10.2f %14.4f %7.3f %6.0fs\n", "xLSTM student, delta-distillation", distilled.eval.student_ppl,
              distilled.eval.kl, distilled.eval.top1, distilled.seconds);
  if (base)
    std::printf("  %-38s %10.2f %14.4f %7.3f %6.0fs\n", "xLSTM student, CE only (same budget)", baseline.eval.student_ppl,
                baseline.eval.kl, baseline.eval.top1, baseline.seconds);
  std::fflush(stdout);
  std::string extra = base ? " '" + (fs::path(out) / "ce_only").string() + "'" : "";
  extra += " --out '" + out + "'";
  const bool plotted = run_plot((fs::path(out) / "distilled").string(), extra) == 0;
  std::printf("\nEverything is in %s/:\n", out.c_str());
  std::printf("  distilled/student.safetensors   the distilled student (NX-AI xLSTMLMModel names) + .config.json\n");
  std::printf("  distilled/metrics.csv, .jsonl   per-step loss terms, schedules, throughput; evaluations\n");
  if (base) std::printf("  ce_only/                        the CE-only comparison run\n");
  if (plotted) std::printf("  *.png                           loss, perplexity and schedule curves\n");
  else std::printf("  (plots skipped: install python3-matplotlib, then run `distilx plot %s/distilled`)\n", out.c_str());
  std::printf("Try: distilx generate --student %s/distilled/student.safetensors --tokenizer %s/teacher/tokenizer.json "
              "--prompt \"And God said\"\n",
              out.c_str(), assets.c_str());
  return 0;
}

const char* kTopUsage =
    "Usage: distilx [COMMAND] [options]\n"
    "Distil a Hugging Face transformer into an xLSTM student (Distil-xLSTM).\n\n"
    "Commands:\n"
    "  distill    train a student from a teacher directory and data (Δ-distillation)\n"
    "  eval       student vs teacher perplexity, KL and top-1 agreement on data\n"
    "  generate   stream text from a student (recurrent state, constant memory)\n"
    "  tokenize   text / jsonl -> token shards\n"
    "  export     a run's student -> safetensors with NX-AI xLSTMLMModel names + config JSON\n"
    "  import     an NX-AI xLSTMLMModel checkpoint -> a distilx student file\n"
    "  plot       PNG curves from a run's metrics\n"
    "  demo       the embedded demo (also what `distilx` with no arguments runs)\n\n"
    "`distilx COMMAND --help` shows a command's options. Exit status: 0 success, 1 failure, 2 usage error.";

}  // namespace

int main(int argc, char** argv) {
  try {
    if (argc < 2) {
      std::signal(SIGINT, app::on_sigint);
      return cmd_demo(1, argv);
    }
    const std::string cmd = argv[1];
    if (cmd == "--help" || cmd == "-h" || cmd == "help") {
      std::cout << kTopUsage << "\n";
      return 0;
    }
    if (cmd == "--version") {
      std::cout << "distilx " << version_string() << "\n";
      return 0;
    }
    // Subcommand parsers see argv[1..] (argv[0] of the sub-parse is the command name).
    int sub_argc = argc - 1;
    char** sub_argv = argv + 1;
    if (cmd == "distill" || cmd == "demo" || cmd[0] == '-') std::signal(SIGINT, app::on_sigint);
    if (cmd == "distill") return cmd_distill(sub_argc, sub_argv);
    if (cmd == "eval") return cmd_eval(sub_argc, sub_argv);
    if (cmd == "generate") return cmd_generate(sub_argc, sub_argv);
    if (cmd == "tokenize") return cmd_tokenize(sub_argc, sub_argv);
    if (cmd == "export") return cmd_export(sub_argc, sub_argv);
    if (cmd == "import") return cmd_import(sub_argc, sub_argv);
    if (cmd == "plot") return cmd_plot(sub_argc, sub_argv);
    if (cmd == "demo") return cmd_demo(sub_argc, sub_argv);
    if (!cmd.empty() && cmd[0] == '-') return cmd_demo(argc, argv);
    throw UsageError("unknown command '" + cmd + "'");
  } catch (const UsageError& e) {
    std::cerr << "distilx: " << e.what() << "\nTry 'distilx --help'.\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "distilx: " << e.what() << "\n";
    return 1;
  }
}
