// Multi-process tests of distilx/parallel: one process per GPU. Without RANK in the environment
// the program is the driver: it exits 77 (skipped) when fewer GPUs than --gpus are visible, and
// otherwise starts itself --gpus times through parallel::launch_local. Each case is one launch:
//
//   collectives  all-reduce / reduce-scatter / all-gather / metric sums against host sums
//   mismatch     start-up checks: differing fingerprints and layouts throw config_error on all ranks
//   gradients    the student's gradients averaged over ranks (replicate and ZeRO-1, grad accumulation
//                1 and 2, overlapped buckets on and off) equal the mean of each rank's own gradients
//   zero1        ZeRO-1 AdamW (reduce-scatter, shard update, all-gather) equals plain data-parallel
//                AdamW over 5 steps; its gathered optimizer state resumes a plain 1-GPU optimizer
//   timeout      a rank skips a collective: the waiting rank throws nccl_error naming itself
//   watchdog     same, while the waiting rank is blocked outside the policy: the watchdog aborts
//   die          rank 1 exits mid-run: no hang (the launcher, or the deadline, ends rank 0)
//   bench        tokens/s of the paper-size student's training step on this many GPUs
//   distill-bench  tokens/s of the whole paper-scale distillation step (teacher included)
//   distiller    (DISTILX_NCCL_DISTILLER_TEST) the Distiller's loss curve on N GPUs vs 1 GPU
//
// run_nccl_tests.sh runs them all and checks the fault cases' messages and exit codes.
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "distilx/cuda.cuh"
#include "distilx/parallel/data_parallel.cuh"
#include "distilx/parallel/launch.hpp"
#include "nccl_test_common.hpp"

namespace dx = distilx;
namespace par = distilx::parallel;
using Dev = distilx::cuda;
using dx::index_t;
using nccl_test::Args;
using nccl_test::Checker;

namespace {

std::vector<float> random_vector(std::size_t n, std::uint64_t seed, double sd = 1.0) {
  dx::Rng rng(seed);
  std::vector<float> v(n);
  for (auto& x : v) x = static_cast<float>(sd * rng.normal());
  return v;
}

std::vector<float> to_host(const float* dev, index_t n) {
  std::vector<float> h(static_cast<std::size_t>(n));
  if (n) DISTILX_CUDA_CHECK(cudaMemcpy(h.data(), dev, sizeof(float) * n, cudaMemcpyDeviceToHost));
  return h;
}

// max |a - b| / max(max |b|, tiny) over [lo, hi)
double rel_diff(const std::vector<float>& a, const std::vector<float>& b, std::size_t lo, std::size_t hi) {
  double d = 0, m = 1e-30;
  for (std::size_t i = lo; i < hi; ++i) {
    d = std::max(d, std::fabs(double(a[i]) - double(b[i])));
    m = std::max(m, std::fabs(double(b[i])));
  }
  return d / m;
}

dx::StudentConfig small_student(index_t d = 64) {
  dx::StudentConfig c;
  c.vocab_size = 97;
  c.embedding_dim = d;
  c.num_blocks = 3;
  c.slstm_at = {1};
  c.mlstm_num_heads = 4;
  c.slstm_num_heads = 4;
  c.mlstm_chunk_size = 8;
  return c;
}

// ---------------------------------------------------------------------------------------------
/// One 64-element tensor: enough parameters for the collective and fault cases' policies.
dx::ParamLayout one_tensor_layout() {
  dx::ParamLayout layout;
  layout.add("w.weight", {64});
  return layout;
}

int case_collectives(par::Communicator& comm, Checker& ck) {
  const int W = comm.world_size(), r = comm.rank();
  const std::size_t n = 1000003;  // odd: no collective sees a nicely divisible size
  std::vector<std::vector<float>> all(static_cast<std::size_t>(W));
  for (int q = 0; q < W; ++q) all[static_cast<std::size_t>(q)] = random_vector(n, 100 + q);
  std::vector<float> sum(n, 0.f);
  for (std::size_t i = 0; i < n; ++i) {
    double s = 0;
    for (int q = 0; q < W; ++q) s += all[static_cast<std::size_t>(q)][i];
    sum[i] = static_cast<float>(s);
  }
  dx::Buffer<float, Dev> x(static_cast<index_t>(n)), y(static_cast<index_t>(n));
  DISTILX_CUDA_CHECK(cudaDeviceSynchronize());
  x.copy_from_host(all[static_cast<std::size_t>(r)].data(), static_cast<index_t>(n));
  comm.all_reduce(x.data(), y.data(), n, ncclSum);
  comm.synchronize("test all-reduce");
  ck.expect_le("all_reduce sum", rel_diff(to_host(y.data(), n), sum, 0, n), 1e-6);

  comm.all_reduce(x.data(), x.data(), n, ncclAvg);  // in place
  comm.synchronize("test all-reduce avg");
  std::vector<float> avg(sum);
  for (auto& v : avg) v /= float(W);
  ck.expect_le("all_reduce avg in place", rel_diff(to_host(x.data(), n), avg, 0, n), 1e-6);

  // reduce-scatter then all-gather of a W * c buffer
  const std::size_t c = 4099;
  std::vector<float> mine = random_vector(c * W, 200 + r);
  std::vector<float> rs_sum(c * W, 0.f);
  for (int q = 0; q < W; ++q) {
    const auto v = random_vector(c * W, 200 + q);
    for (std::size_t i = 0; i < c * W; ++i) rs_sum[i] += v[i];
  }
  dx::Buffer<float, Dev> big(static_cast<index_t>(c * W));
  DISTILX_CUDA_CHECK(cudaDeviceSynchronize());
  big.copy_from_host(mine.data(), static_cast<index_t>(c * W));
  comm.reduce_scatter(big.data(), big.data() + r * c, c, ncclSum);  // in place
  comm.all_gather(big.data() + r * c, big.data(), c);               // in place
  comm.synchronize("test reduce-scatter + all-gather");
  ck.expect_le("reduce_scatter + all_gather", rel_diff(to_host(big.data(), c * W), rs_sum, 0, c * W), 1e-6);

  // The policy's host-side helpers.
  dx::ParamLayout layout;
  layout.add("w.weight", {1000});
  par::NcclDataParallel<float> dp(nccl_test::borrow(comm), layout);
  double vals[3] = {1.0 + r, 1e-3 * r, -2.0};
  dp.all_reduce_sum(vals, 3);
  ck.expect_le("all_reduce_sum metrics", std::fabs(vals[0] - W * (W + 1) / 2.0) + std::fabs(vals[1] - 1e-3 * W * (W - 1) / 2.0) +
                                             std::fabs(vals[2] + 2.0 * W), 1e-12);
  bool threw = false;
  try {
    dp.check_same_on_all_ranks("a value every rank shares", 0x1234);
  } catch (const std::exception&) {
    threw = true;
  }
  ck.expect("check_same_on_all_ranks passes when equal", !threw);
  dp.barrier();
  ck.expect("barrier", true);
  // broadcast from the last rank
  dx::Buffer<float, Dev> b(5);
  std::vector<float> hb(5, float(r));
  DISTILX_CUDA_CHECK(cudaDeviceSynchronize());
  b.copy_from_host(hb.data(), 5);
  dp.broadcast(b.data(), 5, W - 1);
  ck.expect_le("broadcast from the last rank", std::fabs(to_host(b.data(), 5)[4] - float(W - 1)), 0);
  return 0;
}

// ---------------------------------------------------------------------------------------------
int case_mismatch(par::Communicator& comm, Checker& ck) {
  auto shared = nccl_test::borrow(comm);
  par::NcclDataParallel<float> dp(shared, one_tensor_layout());
  std::string msg;
  try {
    dp.check_same_on_all_ranks("run configuration", 1000 + comm.rank());
  } catch (const dx::config_error& e) {
    msg = e.what();
  }
  ck.expect("differing fingerprints throw config_error on every rank", !msg.empty());
  ck.expect("the message names the differing rank", msg.find("rank 1 has") != std::string::npos &&
                                                         msg.find("differs from rank 0") != std::string::npos);
  if (comm.rank() == 0) std::printf("  message: %s\n", msg.c_str());

  // Different student shapes on rank 1: the policy's constructor refuses.
  msg.clear();
  try {
    dx::ParamLayout l2;
    l2.add("w.weight", {comm.rank() == 1 ? 65 : 64});
    par::NcclDataParallel<float> bad(shared, l2);
  } catch (const dx::config_error& e) {
    msg = e.what();
  }
  ck.expect("differing parameter layouts are refused at start-up", msg.find("parameter layout") != std::string::npos);

  // ...and differing modes.
  msg.clear();
  try {
    par::DataParallelOptions o;
    o.mode = comm.rank() == 0 ? par::ShardingMode::replicate : par::ShardingMode::zero1;
    par::NcclDataParallel<float> bad(shared, one_tensor_layout(), o);
  } catch (const dx::config_error& e) {
    msg = e.what();
  }
  ck.expect("differing data-parallel modes are refused at start-up", msg.find("data-parallel mode") != std::string::npos);
  dp.barrier();  // config errors leave the communicator usable
  ck.expect("communicator usable after configuration errors", true);
  return 0;
}

// ---------------------------------------------------------------------------------------------
// Each rank's local gradient over `accum` micro-batches (averaged), for the seed of step `step`.
struct Micro {
  std::vector<std::int32_t> tok;
  std::vector<float> dh;
};
Micro make_micro(const dx::StudentConfig& c, index_t B, index_t T, int rank, int a) {
  Micro m;
  dx::Rng rng(1000 + 17 * rank + a);
  m.tok.resize(static_cast<std::size_t>(B * T));
  for (auto& t : m.tok) t = static_cast<std::int32_t>(rng.below(static_cast<std::uint64_t>(c.vocab_size)));
  m.dh = random_vector(static_cast<std::size_t>(B * T * c.embedding_dim), 5000 + 31 * rank + a, 0.1);
  return m;
}

int case_gradients(par::Communicator& comm, Checker& ck) {
  const int W = comm.world_size(), r = comm.rank();
  auto shared = nccl_test::borrow(comm);
  const dx::StudentConfig c = small_student();
  const index_t B = 2, T = 24;
  dx::Student<float, Dev> s(c);
  s.init(7);
  const index_t n = s.flat_size();
  dx::Buffer<float, Dev> dh(B * T * c.embedding_dim);
  dx::Buffer<float, Dev> gathered(n * W);

  for (index_t accum : {1, 2}) {
    // Reference: this rank's own averaged gradient, then every rank's, and their mean.
    s.zero_grad();
    for (int a = 0; a < accum; ++a) {
      const Micro m = make_micro(c, B, T, r, a);
      DISTILX_CUDA_CHECK(cudaDeviceSynchronize());
      dh.copy_from_host(m.dh.data(), B * T * c.embedding_dim);
      s.forward(m.tok.data(), B, T);
      s.backward(dh.data());
    }
    if (accum > 1) dx::ops::scale(Dev{}, s.grads(), 1.0f / float(accum), n);
    DISTILX_CUDA_CHECK(cudaDeviceSynchronize());
    DISTILX_CUDA_CHECK(cudaMemcpy(gathered.data() + r * n, s.grads(), sizeof(float) * n, cudaMemcpyDeviceToDevice));
    comm.all_gather(gathered.data() + r * n, gathered.data(), static_cast<std::size_t>(n));
    comm.synchronize("gather of the reference gradients");
    const std::vector<float> all = to_host(gathered.data(), n * W);
    std::vector<float> mean(static_cast<std::size_t>(n), 0.f);
    double ss = 0;
    for (index_t i = 0; i < n; ++i) {
      double acc = 0;
      for (int q = 0; q < W; ++q) acc += all[static_cast<std::size_t>(q * n + i)];
      mean[static_cast<std::size_t>(i)] = static_cast<float>(acc / W);
      ss += double(mean[static_cast<std::size_t>(i)]) * mean[static_cast<std::size_t>(i)];
    }

    for (auto mode : {par::ShardingMode::replicate, par::ShardingMode::zero1})
      for (bool overlap : {true, false}) {
        par::DataParallelOptions o;
        o.mode = mode;
        o.overlap = overlap;
        o.bucket_bytes = 16 << 10;  // small: many buckets even for this small student
        par::NcclDataParallel<float> dp(shared, s, o);
        s.zero_grad();
        dp.begin_step(accum);
        for (int a = 0; a < accum; ++a) {
          const Micro m = make_micro(c, B, T, r, a);
          DISTILX_CUDA_CHECK(cudaDeviceSynchronize());
          dh.copy_from_host(m.dh.data(), B * T * c.embedding_dim);
          s.forward(m.tok.data(), B, T);
          s.backward(dh.data());
        }
        // As the Distiller does: the accumulation average on the compute stream, then the reduction.
        if (accum > 1) dx::ops::scale(Dev{}, s.grads(), 1.0f / float(accum), n);
        dp.reduce_gradients(s.grads(), n);
        const double got_ss = dp.grad_sum_squares(s.grads(), n);
        const std::vector<float> g = s.grads_to_host();
        const std::size_t lo = mode == par::ShardingMode::zero1 ? static_cast<std::size_t>(dp.shard_begin()) : 0;
        const std::size_t hi = mode == par::ShardingMode::zero1 ? static_cast<std::size_t>(dp.shard_end()) : n;
        const std::string tag = dx::detail::concat(par::to_string(mode), ", grad_accum ", accum, ", overlap ",
                                                   overlap ? "on" : "off");
        ck.expect_le("mean gradient (" + tag + ")", rel_diff(g, mean, lo, hi), 2e-6);
        ck.expect_le("grad_sum_squares (" + tag + ")", std::fabs(got_ss - ss) / ss, 1e-5);
        if (overlap)
          ck.expect("buckets launched during the backward (" + tag + "): " + std::to_string(dp.overlapped_buckets()),
                    dp.overlapped_buckets() >= 3);
        else
          ck.expect("no bucket launched with overlap off (" + tag + ")", dp.overlapped_buckets() == 0);
      }
  }
  return 0;
}

// ---------------------------------------------------------------------------------------------
int case_zero1(par::Communicator& comm, Checker& ck) {
  const int r = comm.rank();
  auto shared = nccl_test::borrow(comm);
  const dx::StudentConfig c = small_student(128);
  dx::Student<float, Dev> probe(c);
  const dx::ParamLayout& layout = probe.layout();
  const index_t n = layout.total();
  dx::AdamWConfig acfg{1e-2, 0.9, 0.99, 1e-8, 0.05};

  par::DataParallelOptions plain_o, zero_o;
  plain_o.adamw = zero_o.adamw = acfg;
  zero_o.mode = par::ShardingMode::zero1;
  par::NcclDataParallel<float> plain(shared, layout, plain_o), zero(shared, layout, zero_o);
  dx::AdamW<float, Dev> full(layout, acfg);

  std::vector<float> p0 = random_vector(static_cast<std::size_t>(n), 42);  // identical on every rank
  dx::Buffer<float, Dev> p_plain(n), p_zero(n), g_plain(n), g_zero(n);
  DISTILX_CUDA_CHECK(cudaDeviceSynchronize());
  p_plain.copy_from_host(p0.data(), n);
  p_zero.copy_from_host(p0.data(), n);
  auto step = [&](int k, dx::AdamW<float, Dev>& opt_plain) {
    const std::vector<float> g = random_vector(static_cast<std::size_t>(n), 1000 * k + r);  // differs per rank
    DISTILX_CUDA_CHECK(cudaDeviceSynchronize());
    g_plain.copy_from_host(g.data(), n);
    g_zero.copy_from_host(g.data(), n);
    const double lr = 1e-2 / k;
    plain.reduce_gradients(g_plain.data(), n);
    opt_plain.step(p_plain.data(), g_plain.data(), lr);
    zero.reduce_gradients(g_zero.data(), n);
    zero.update(p_zero.data(), g_zero.data(), n, lr);
  };
  for (int k = 1; k <= 5; ++k) step(k, full);
  DISTILX_CUDA_CHECK(cudaDeviceSynchronize());
  const auto hp = to_host(p_plain.data(), n), hz = to_host(p_zero.data(), n);
  ck.expect_le("ZeRO-1 parameters equal plain data parallel after 5 AdamW steps (all ranks, whole buffer)",
               rel_diff(hz, hp, 0, static_cast<std::size_t>(n)), 1e-6);

  std::vector<float> m, v;
  index_t steps = 0;
  zero.get_optimizer_state(m, v, steps);
  ck.expect("gathered optimizer step count", steps == 5 && full.step_count() == 5);
  ck.expect_le("gathered exp_avg equals the plain optimizer's", rel_diff(m, full.exp_avg().to_host(), 0, n), 1e-6);
  ck.expect_le("gathered exp_avg_sq equals the plain optimizer's", rel_diff(v, full.exp_avg_sq().to_host(), 0, n), 1e-6);
  std::printf("  [rank %d] ZeRO-1 optimizer state on this rank: %lld of %lld elements\n", r,
              (long long)(zero.shard_end() - zero.shard_begin()), (long long)n);

  // Resume the gathered state on a plain (1-GPU style) optimizer, and on a fresh ZeRO-1 policy;
  // one more step on each must match the uninterrupted run.
  dx::AdamW<float, Dev> resumed(layout, acfg);
  upload(resumed.exp_avg(), 0, m.data(), n);
  upload(resumed.exp_avg_sq(), 0, v.data(), n);
  resumed.set_step_count(steps);
  par::NcclDataParallel<float> zero2(shared, layout, zero_o);
  zero2.set_optimizer_state(m.data(), v.data(), n, steps);
  dx::Buffer<float, Dev> p_res(p_plain), p_z2(p_zero);
  const std::vector<float> g6 = random_vector(static_cast<std::size_t>(n), 6000 + r);
  DISTILX_CUDA_CHECK(cudaDeviceSynchronize());
  g_plain.copy_from_host(g6.data(), n);
  plain.reduce_gradients(g_plain.data(), n);
  dx::Buffer<float, Dev> g_copy(g_plain);
  full.step(p_plain.data(), g_plain.data(), 1e-3);
  resumed.step(p_res.data(), g_copy.data(), 1e-3);
  g_zero.copy_from_host(g6.data(), n);
  zero2.reduce_gradients(g_zero.data(), n);
  zero2.update(p_z2.data(), g_zero.data(), n, 1e-3);
  DISTILX_CUDA_CHECK(cudaDeviceSynchronize());
  const auto a = to_host(p_plain.data(), n);
  ck.expect_le("ZeRO-1 state resumed by a plain optimizer (2 -> 1 GPU)", rel_diff(to_host(p_res.data(), n), a, 0, n), 1e-6);
  ck.expect_le("ZeRO-1 state resumed by a fresh ZeRO-1 policy", rel_diff(to_host(p_z2.data(), n), a, 0, n), 1e-6);
  return 0;
}

// ---------------------------------------------------------------------------------------------
// Rank 0 waits for a collective rank 1 never joins.
int case_timeout(par::Communicator& comm, Checker& ck) {
  auto shared = nccl_test::borrow(comm);
  par::NcclDataParallel<float> dp(shared, one_tensor_layout());
  double warm = 1;
  dp.all_reduce_sum(&warm, 1);  // connections of this very collective exist before rank 1 stops
  dp.barrier();
  if (comm.rank() != 0) {
    std::this_thread::sleep_for(std::chrono::duration<double>(comm.timeout_s() + 3));
    ck.expect("non-participating rank slept", true);
    return 0;
  }
  const auto t0 = std::chrono::steady_clock::now();
  std::string msg;
  try {
    double v = 1;
    dp.all_reduce_sum(&v, 1);
  } catch (const dx::nccl_error& e) {
    msg = e.what();
  }
  const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("  [rank 0] after %.1f s: %s\n", dt, msg.c_str());
  ck.expect("the wait throws nccl_error", !msg.empty());
  ck.expect("the message names the rank", msg.find("rank 0 of") != std::string::npos);
  ck.expect("the message says it timed out", msg.find("did not complete within") != std::string::npos);
  ck.expect_le("no hang: thrown within the deadline + 10 s", dt, comm.timeout_s() + 10);
  // Every later call fails the same way instead of hanging.
  bool again = false;
  try {
    dp.barrier();
  } catch (const dx::nccl_error&) {
    again = true;
  }
  ck.expect("later calls throw at once", again);
  return 0;
}

// Rank 0 is blocked in a plain cudaMemcpy behind an overlapped reduction rank 1 never joins:
// only the watchdog can notice.
int case_watchdog(par::Communicator& comm, Checker& ck) {
  auto shared = nccl_test::borrow(comm);
  const dx::StudentConfig c = small_student();
  dx::Student<float, Dev> s(c);
  s.init(3);
  par::DataParallelOptions o;
  o.bucket_bytes = 16 << 10;
  par::NcclDataParallel<float> dp(shared, s, o);
  const index_t B = 1, T = 16;
  const Micro m = make_micro(c, B, T, comm.rank(), 0);
  dx::Buffer<float, Dev> dh(B * T * c.embedding_dim);
  DISTILX_CUDA_CHECK(cudaDeviceSynchronize());
  dh.copy_from_host(m.dh.data(), B * T * c.embedding_dim);
  auto step = [&] {
    s.zero_grad();
    dp.begin_step(1);
    s.forward(m.tok.data(), B, T);
    s.backward(dh.data());  // overlapped buckets
  };
  step();  // one full step on both ranks: every bucket's connections exist
  dp.reduce_gradients(s.grads(), s.flat_size());
  dp.barrier();
  if (comm.rank() != 0) {
    std::this_thread::sleep_for(std::chrono::duration<double>(comm.timeout_s() + 5));
    return 0;
  }
  const auto t0 = std::chrono::steady_clock::now();
  std::string msg;
  try {
    step();                                    // buckets go out to a peer that never answers
    std::vector<float> g = s.grads_to_host();  // blocks behind them until the watchdog aborts
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::printf("  [rank 0] the blocked copy returned after %.1f s\n", dt);
    dp.reduce_gradients(s.grads(), s.flat_size());
  } catch (const dx::nccl_error& e) {
    msg = e.what();
  }
  const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("  [rank 0] after %.1f s: %s\n", dt, msg.c_str());
  ck.expect_le("unblocked after the watchdog's abort (deadline + 10 s)", dt, comm.timeout_s() + 10);
  ck.expect("the next policy call throws the watchdog's reason naming the rank",
            msg.find("watchdog") != std::string::npos && msg.find("rank 0 of") != std::string::npos);
  return 0;
}

int case_die(par::Communicator& comm, Checker& ck) {
  auto shared = nccl_test::borrow(comm);
  par::NcclDataParallel<float> dp(shared, one_tensor_layout());
  dp.barrier();
  if (comm.rank() == 1) {
    std::fprintf(stderr, "  [rank 1] exiting with code 7 on purpose\n");
    std::fflush(stderr);
    std::_Exit(7);
  }
  try {
    for (int i = 0; i < 1000000; ++i) {
      double v = 1;
      dp.all_reduce_sum(&v, 1);
    }
  } catch (const dx::nccl_error& e) {
    std::fprintf(stderr, "  [rank %d] %s\n", comm.rank(), e.what());
    return 3;
  }
  ck.expect("rank 0 noticed the dead rank", false);
  return 0;
}

// ---------------------------------------------------------------------------------------------
// Tokens/s of the paper-size student's training step (forward, backward with overlapped
// reduction, clipping norm, AdamW) on this many GPUs, per-GPU batch fixed (weak scaling).
int case_bench(par::Communicator& comm, const Args& args) {
  const int W = comm.world_size();
  const dx::StudentConfig c = dx::StudentConfig::paper();
  dx::cuda_backend::set_math_mode(args.tf32 ? dx::cuda_backend::MathMode::tf32 : dx::cuda_backend::MathMode::fp32);
  dx::Student<float, Dev> s(c);
  {
    dx::Student<float> host_init(dx::StudentConfig::paper(64, c.embedding_dim));
    host_init.init(1);
    s.set_params(host_init.params_to_host().data());
  }
  const index_t n = s.flat_size(), B = args.batch, T = args.seq;
  par::DataParallelOptions o;
  o.mode = args.zero1 ? par::ShardingMode::zero1 : par::ShardingMode::replicate;
  o.overlap = args.overlap;
  o.bucket_bytes = static_cast<std::size_t>(args.bucket_mb * (1 << 20));
  auto shared = nccl_test::borrow(comm);
  par::NcclDataParallel<float> dp(shared, s, o);
  std::unique_ptr<dx::AdamW<float, Dev>> opt;
  if (!args.zero1) opt = std::make_unique<dx::AdamW<float, Dev>>(s.layout());
  std::vector<std::int32_t> tok(static_cast<std::size_t>(B * T));
  dx::Rng rng(11 + comm.rank());
  for (auto& t : tok) t = static_cast<std::int32_t>(rng.below(static_cast<std::uint64_t>(c.vocab_size)));
  dx::Buffer<float, Dev> dh(B * T * c.embedding_dim);
  {
    const auto h = random_vector(static_cast<std::size_t>(B * T * c.embedding_dim), 99 + comm.rank(), 1e-3);
    DISTILX_CUDA_CHECK(cudaDeviceSynchronize());
    dh.copy_from_host(h.data(), B * T * c.embedding_dim);
  }
  auto one_step = [&] {
    s.zero_grad();
    dp.begin_step(1);
    s.forward(tok.data(), B, T);
    s.backward(dh.data());
    dp.reduce_gradients(s.grads(), n);
    const double norm = std::sqrt(dp.grad_sum_squares(s.grads(), n));
    if (norm > 1.0) dx::ops::scale(Dev{}, s.grads(), static_cast<float>(1.0 / (norm + 1e-6)), n);
    if (args.zero1) dp.update(s.params(), s.grads(), n, 1e-5);
    else opt->step(s.params(), s.grads(), 1e-5);
  };
  for (int i = 0; i < args.warmup; ++i) one_step();
  DISTILX_CUDA_CHECK(cudaDeviceSynchronize());
  dp.barrier();
  const auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < args.steps; ++i) one_step();
  DISTILX_CUDA_CHECK(cudaDeviceSynchronize());
  dp.barrier();
  const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / args.steps;
  double worst = dt;
  dp.all_reduce_sum(&worst, 1);  // mean step time over ranks
  worst /= W;
  std::size_t free_b = 0, total_b = 0;
  DISTILX_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
  if (comm.rank() == 0) {
    cudaDeviceProp prop{};
    DISTILX_CUDA_CHECK(cudaGetDeviceProperties(&prop, comm.device()));
    std::printf("RESULT gpus=%d mode=%s overlap=%d tf32=%d batch_per_gpu=%lld seq=%lld params=%lld step_ms=%.2f "
                "tokens_per_s=%.0f mem_gib=%.2f device=\"%s\"\n",
                W, par::to_string(o.mode), int(o.overlap), int(args.tf32), (long long)B, (long long)T, (long long)n,
                worst * 1e3, double(B * T * W) / worst, double(total_b - free_b) / (1 << 30), prop.name);
  }
  return 0;
}

}  // namespace

#if defined(DISTILX_NCCL_DISTILLER_TEST)
int run_distiller_case(par::Communicator& comm, const Args& args, Checker& ck);  // test_nccl_distiller.cu
int run_distill_bench_case(par::Communicator& comm, const Args& args);          // test_nccl_distiller.cu
#endif

int main(int argc, char** argv) {
  Args args;
  try {
    args = nccl_test::parse_args(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 2;
  }
  if (args.device_count) {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) n = 0;
    std::printf("%d\n", n);
    return 0;
  }
  if (!par::is_launched_worker() && !std::getenv("RANK") && !std::getenv("OMPI_COMM_WORLD_RANK") &&
      !std::getenv("SLURM_STEP_NUM_TASKS")) {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) n = 0;
    if (n < args.gpus) {
      std::printf("SKIP %s: needs %d GPUs, %d visible\n", args.case_name.c_str(), args.gpus, n);
      return 77;
    }
    return par::launch_local(args.gpus, argc, argv);
  }
  std::shared_ptr<par::Communicator> comm;
  try {
    comm = par::Communicator::from_environment();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "communicator: %s\n", e.what());
    return 4;
  }
  Checker ck(comm->rank(), comm->world_size(), args.case_name);
  int rc = 0;
  try {
    if (args.case_name == "collectives") rc = case_collectives(*comm, ck);
    else if (args.case_name == "mismatch") rc = case_mismatch(*comm, ck);
    else if (args.case_name == "gradients") rc = case_gradients(*comm, ck);
    else if (args.case_name == "zero1") rc = case_zero1(*comm, ck);
    else if (args.case_name == "timeout") rc = case_timeout(*comm, ck);
    else if (args.case_name == "watchdog") rc = case_watchdog(*comm, ck);
    else if (args.case_name == "die") rc = case_die(*comm, ck);
    else if (args.case_name == "bench") rc = case_bench(*comm, args);
#if defined(DISTILX_NCCL_DISTILLER_TEST)
    else if (args.case_name == "distiller") rc = run_distiller_case(*comm, args, ck);
    else if (args.case_name == "distill-bench") rc = run_distill_bench_case(*comm, args);
#endif
    else {
      std::fprintf(stderr, "unknown case '%s'\n", args.case_name.c_str());
      return 2;
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "[rank %d/%d] %s: unexpected exception: %s\n", comm->rank(), comm->world_size(),
                 args.case_name.c_str(), e.what());
    return 5;
  }
  return rc != 0 ? rc : ck.finish();
}
