// The end-to-end check of the issue: Distiller<Student<float, cuda>, LlamaTeacher<float, cuda>>
// with a small random teacher, the same global batch (4 rows of 32 tokens) and seed on every GPU
// count (--rank-batch=B instead fixes the rows per rank). Rank 0 writes "step loss" lines to --out; with --reference it compares its curve with
// the reference's (relative 1e-5 by default, the same steps). --run-dir writes a checkpoint at the
// --stop-at step (root only; collective state gathered first); --resume DIR resumes from the newest
// checkpoint in DIR, possibly written on another number of GPUs.
//
// Built only with -DDISTILX_NCCL_DISTILLER_TEST=ON: it needs the GPU Distiller with
// set_data_parallel() and the CUDA teacher.
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include "distilx/cuda.cuh"
#include "distilx/parallel/data_parallel.cuh"
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
        std::shared_ptr<par::Communicator>(&comm, [](par::Communicator*) {}), student, o);
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
