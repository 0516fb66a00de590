// The end-to-end check of the issue: Distiller<Student<float, cuda>, LlamaTeacher<float, cuda>>
// with a small random teacher, the same global batch (4 rows of 32 tokens) and seed on every GPU
// count (--rank-batch=B instead fixes the rows per rank). Rank 0 writes "step loss" lines to --out; with --reference it compares its curve with
// the reference's (relative 1e-5 by default, the same steps). --run-dir writes a checkpoint at the
// --stop-at step (root only; collective state gathered first); --resume DIR resumes from the newest
// checkpoint in DIR, possibly written on another number of GPUs.
//
// --case=distill-bench (run_distill_bench_case) is the scaling measurement: the paper-scale step of
// bench/paper_step_bench (Qwen2.5-1.5B-shaped teacher, paper student, --batch x --seq tokens per
// GPU, bf16 by default) through Distiller::step on every rank; prints one RESULT line.
//
// Built only with -DDISTILX_NCCL_DISTILLER_TEST=ON: it needs the GPU Distiller with
// set_data_parallel() and the CUDA teacher.
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include "distilx/cuda.cuh"
#include "distilx/parallel/data_parallel.cuh"
#include "cuda_bench_util.cuh"  // bench/: the Qwen2.5-1.5B-shaped teacher for the scaling case
#include "nccl_test_common.hpp"

namespace dx = distilx;
namespace par = distilx::parallel;
namespace fs = std::filesystem;
using Dev = distilx::cuda;
using dx::index_t;

namespace {

constexpr index_t kVocab = 96, kSeq = 32, kGlobalBatch = 4;

dx::io::HfModelConfig teacher_config() {
  nlohmann::json j{{"architectures", {"Qwen2ForCausalLM"}}, {"model_type", "qwen2"}, {"vocab_size", kVocab},
                   {"hidden_size", 64}, {"intermediate_size", 128}, {"num_hidden_layers", 4},
                   {"num_attention_heads", 4}, {"num_key_value_heads", 2}, {"rms_norm_eps", 1e-6},
                   {"max_position_embeddings", 256}, {"rope_theta", 10000.0}, {"tie_word_embeddings", false}};
  return dx::io::parse_hf_config(j, "nccl distiller test teacher");
}

std::map<index_t, double> read_curve(const std::string& path) {
  std::map<index_t, double> m;
  std::ifstream in(path);
  long long s;
  double v;
  while (in >> s >> v) m[s] = v;
  return m;
}

}  // namespace

int run_distiller_case(par::Communicator& comm, const nccl_test::Args& args, nccl_test::Checker& ck) {
  const int W = comm.world_size(), r = comm.rank();
  if (args.rank_batch <= 0 && kGlobalBatch % W != 0) {
    ck.expect("the global batch of 4 divides among the ranks", false);
    return 0;
  }
  // Data: the same shard on every rank (each writes its own copy; no shared file system needed).
  const fs::path dir = fs::temp_directory_path() / ("distilx_nccl_distiller_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  const std::string shard = (dir / "train.bin").string();
  {
    dx::Rng rng(2024);
    std::vector<std::int32_t> tokens(static_cast<std::size_t>((kSeq + 1) * 400));
    for (auto& t : tokens) t = static_cast<std::int32_t>(rng.below(kVocab));
    dx::data::write_shard(shard, tokens);
  }
  dx::data::LoaderOptions lo;
  lo.seq_len = kSeq;
  lo.batch_size = args.rank_batch > 0 ? args.rank_batch : kGlobalBatch / W;
  lo.world_size = W;
  lo.rank = r;
  lo.seed = 5;
  lo.vocab_size = kVocab;
  lo.val_windows = 16;
  dx::data::TokenLoader loader({shard}, lo);

  dx::LlamaTeacher<float, Dev> teacher(teacher_config());
  {
    dx::Rng rng(11);
    teacher.init_random(rng);
  }
  dx::StudentFromTeacher rule;
  rule.num_blocks = 2;
  rule.num_heads = 4;
  rule.base.mlstm_qkv_proj_blocksize = 4;
  const dx::StudentConfig sc = dx::student_config_for_teacher(kVocab, 64, 4, 4, rule);
  dx::Student<float, Dev> student(sc);
  student.init(17);
  dx::copy_frozen_from_teacher(student, teacher);

  dx::DistillerConfig cfg;
  cfg.max_steps = args.max_steps;
  cfg.adamw.lr = 3e-3;
  cfg.lr = dx::LrScheduleConfig{dx::LrScheduleKind::cosine, 3e-3, 5, 20, 0.1};
  cfg.clip_norm = 1.0;
  cfg.run_dir = args.run_dir;
  dx::Distiller<dx::Student<float, Dev>, dx::LlamaTeacher<float, Dev>> d(student, teacher, loader, cfg);

  par::DataParallelOptions o;
  o.mode = args.zero1 ? par::ShardingMode::zero1 : par::ShardingMode::replicate;
  o.adamw = cfg.adamw;
  o.bucket_bytes = 64 << 10;
  std::shared_ptr<par::NcclDataParallel<float>> dp;
  if (W > 1 || args.zero1) {
    dp = std::make_shared<par::NcclDataParallel<float>>(
        nccl_test::borrow(comm), student, o);
    d.set_data_parallel(dp);
  }
  index_t start = 0;
  if (!args.resume.empty()) {
    std::string newest;
    index_t best = -1;
    for (const auto& e : fs::directory_iterator(args.resume)) {
      const std::string f = e.path().filename().string();
      if (f.rfind("ckpt_", 0) == 0) {
        const index_t s = std::stoll(f.substr(5));
        if (s > best) best = s, newest = e.path().string();
      }
    }
    ck.expect("a checkpoint to resume from in " + args.resume, best >= 0);
    if (best < 0) return 0;
    d.resume(newest);
    start = d.step_count();
    ck.expect("resumed at step " + std::to_string(start), start > 0);
  }
  std::vector<std::pair<index_t, double>> curve;
  const index_t stop = args.stop_at > 0 ? args.stop_at : cfg.max_steps;
  while (d.step_count() < stop) {
    const dx::StepReport rep = d.step();
    curve.emplace_back(rep.step, rep.loss.total);
  }
  if (!cfg.run_dir.empty()) d.checkpoint();
  fs::remove_all(dir);

  if (r != 0) return 0;
  if (!args.out.empty()) {
    std::ofstream out(args.out);
    out.precision(17);
    for (auto& [s, v] : curve) out << s << " " << v << "\n";
  }
  std::printf("[rank 0/%d] %s: steps %lld..%lld, first loss %.8f, last loss %.8f\n", W, o.mode == par::ShardingMode::zero1 ? "zero1" : "replicate",
              (long long)(curve.empty() ? 0 : curve.front().first), (long long)(curve.empty() ? 0 : curve.back().first),
              curve.empty() ? 0.0 : curve.front().second, curve.empty() ? 0.0 : curve.back().second);
  if (!args.reference.empty()) {
    const auto ref = read_curve(args.reference);
    double worst = 0;
    index_t compared = 0;
    for (auto& [s, v] : curve) {
      auto it = ref.find(s);
      if (it == ref.end()) continue;
      worst = std::max(worst, std::fabs(v - it->second) / std::max(1e-30, std::fabs(it->second)));
      ++compared;
    }
    ck.expect("steps compared with the reference: " + std::to_string(compared), compared == static_cast<index_t>(curve.size()));
    ck.expect_le("worst relative loss difference to " + args.reference, worst, args.tolerance);
  }
  return 0;
}

// ---------------------------------------------------------------------------------------------
// Weak scaling of the whole distillation step: each rank runs the paper-scale step on its own
// --batch x --seq tokens (its slice of one shard), gradients reduced over NCCL (overlapped
// buckets; --zero1 shards AdamW). Tokens/s counts every rank's tokens.
int run_distill_bench_case(par::Communicator& comm, const nccl_test::Args& args) {
  namespace cb = dx::cuda_backend;
  const int W = comm.world_size(), r = comm.rank();
  cb::set_math_mode(args.precision == "fp32" ? cb::MathMode::fp32
                    : args.precision == "tf32" ? cb::MathMode::tf32
                    : args.precision == "fp16" ? cb::MathMode::fp16
                                               : cb::MathMode::bf16);
  const index_t B = args.batch, T = args.seq;
  dx::LlamaTeacher<float, Dev> teacher(dx::bench::qwen25_15b());
  dx::bench::init_teacher_on_device(teacher);  // same weights on every rank
  const dx::StudentConfig sc = dx::StudentConfig::paper();
  dx::Student<float, Dev> student(sc);
  student.init(1);
  dx::copy_frozen_from_teacher(student, teacher);

  const fs::path dir = fs::temp_directory_path() / ("distilx_nccl_bench_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  const std::string shard = (dir / "bench_000000.bin").string();
  {
    const index_t windows = static_cast<index_t>(W) * B * (args.warmup + args.steps + 2);
    std::vector<std::int32_t> toks(static_cast<std::size_t>(windows * (T + 1)));
    dx::Rng rng(5);
    for (auto& t : toks) t = static_cast<std::int32_t>(rng.below(static_cast<std::uint64_t>(sc.vocab_size)));
    dx::data::write_shard(shard, toks);
  }
  dx::data::LoaderOptions lo;
  lo.seq_len = T;
  lo.batch_size = B;
  lo.world_size = W;
  lo.rank = r;
  lo.vocab_size = static_cast<std::int32_t>(sc.vocab_size);
  dx::data::TokenLoader loader({shard}, lo);
  dx::DistillerConfig cfg;
  cfg.max_steps = 1000;
  cfg.grad_accum = 1;
  cfg.loss.chunk_rows = 2048;
  if (cb::math_mode() == cb::MathMode::fp16) cfg.loss_scale.enabled = true;
  dx::Distiller<dx::Student<float, Dev>, dx::LlamaTeacher<float, Dev>> d(student, teacher, loader, cfg);
  par::DataParallelOptions o;
  o.mode = args.zero1 ? par::ShardingMode::zero1 : par::ShardingMode::replicate;
  o.overlap = args.overlap;
  o.adamw = cfg.adamw;
  o.bucket_bytes = static_cast<std::size_t>(args.bucket_mb * (1 << 20));
  std::shared_ptr<par::NcclDataParallel<float>> dp;
  if (W > 1 || args.zero1) {
    dp = std::make_shared<par::NcclDataParallel<float>>(
        nccl_test::borrow(comm), student, o);
    d.set_data_parallel(dp);
  }
  auto barrier = [&] {
    if (dp) dp->barrier();
  };
  auto& alloc = cb::CachingAllocator::instance();
  for (int i = 0; i < args.warmup; ++i) d.step();
  DISTILX_CUDA_CHECK(cudaDeviceSynchronize());
  alloc.reset_peak();
  barrier();
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < args.steps; ++i) d.step();
  DISTILX_CUDA_CHECK(cudaDeviceSynchronize());
  barrier();
  const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / args.steps;
  fs::remove_all(dir);
  if (r == 0) {
    cudaDeviceProp prop{};
    DISTILX_CUDA_CHECK(cudaGetDeviceProperties(&prop, comm.device()));
    std::printf("RESULT gpus=%d mode=%s overlap=%d precision=%s batch_per_gpu=%lld seq=%lld step_ms=%.2f "
                "tokens_per_s=%.0f mem_gib=%.2f device=\"%s\"\n",
                W, par::to_string(o.mode), int(o.overlap), args.precision.c_str(), (long long)B, (long long)T, dt * 1e3,
                double(B * T * W) / dt, double(alloc.peak_in_use_bytes()) / double(1ull << 30), prop.name);
    std::fflush(stdout);
  }
  return 0;
}
