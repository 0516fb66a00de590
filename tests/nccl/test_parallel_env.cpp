// GPU-less tests of the multi-process plumbing: launcher environment detection, the id-file
// rendezvous, parallel::launch_local (children, exit codes, failure of one rank stopping the
// others) and the loader resuming a data-parallel state on another number of ranks.
// Plain asserts with messages; exit code 0 when everything passes.
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include "distilx/data/loader.hpp"
#include "distilx/data/shards.hpp"
#include "distilx/parallel/env.hpp"
#include "distilx/parallel/launch.hpp"

namespace par = distilx::parallel;
namespace fs = std::filesystem;

namespace {
int failures = 0;
void check(bool ok, const std::string& what) {
  std::printf("%-4s %s\n", ok ? "ok" : "FAIL", what.c_str());
  failures += ok ? 0 : 1;
}
template <class F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "";
}

const char* const kVars[] = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_RANK",
                             "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE",
                             "PMIX_NAMESPACE", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS",
                             "SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID", "SLURM_STEP_TASKS_PER_NODE",
                             "SLURM_NODEID", "SLURM_JOB_ID", "SLURM_STEP_ID", "DISTILX_RUN_ID", "TORCHELASTIC_RUN_ID",
                             "DISTILX_NCCL_ID_FILE", "DISTILX_NCCL_ID_DIR"};
void clear_env() {
  for (const char* v : kVars) ::unsetenv(v);
}

void test_detect() {
  clear_env();
  auto e = par::detect_env();
  check(e.launcher == par::Launcher::single && e.rank == 0 && e.world_size == 1, "no launcher: single process");

  ::setenv("RANK", "3", 1);
  ::setenv("WORLD_SIZE", "4", 1);
  ::setenv("LOCAL_RANK", "1", 1);
  ::setenv("LOCAL_WORLD_SIZE", "2", 1);
  e = par::detect_env();
  check(e.launcher == par::Launcher::env && e.rank == 3 && e.world_size == 4 && e.local_rank == 1 &&
            e.local_world_size == 2 && !e.single_node(),
        "RANK/WORLD_SIZE/LOCAL_RANK: " + e.describe());
  ::setenv("RANK", "4", 1);
  check(error_of([] { par::detect_env(); }).find("RANK='4'") != std::string::npos, "RANK outside [0, WORLD_SIZE) is refused");
  ::setenv("RANK", "x1", 1);
  check(error_of([] { par::detect_env(); }).find("not an integer") != std::string::npos, "malformed RANK is refused");
  ::setenv("RANK", "0", 1);
  ::unsetenv("LOCAL_RANK");
  check(error_of([] { par::detect_env(); }).find("LOCAL_RANK") != std::string::npos, "missing LOCAL_RANK is refused");
  clear_env();

  ::setenv("OMPI_COMM_WORLD_RANK", "5", 1);
  ::setenv("OMPI_COMM_WORLD_SIZE", "8", 1);
  ::setenv("OMPI_COMM_WORLD_LOCAL_RANK", "1", 1);
  ::setenv("OMPI_COMM_WORLD_LOCAL_SIZE", "4", 1);
  ::setenv("PMIX_NAMESPACE", "prterun-host-123@1", 1);
  e = par::detect_env();
  check(e.launcher == par::Launcher::openmpi && e.rank == 5 && e.world_size == 8 && e.local_rank == 1 &&
            e.job_key == "prterun-host-123@1",
        "Open MPI: " + e.describe());
  ::setenv("HOME", "/shared/home", 1);
  check(par::id_file_path(e) == "/shared/home/.distilx-nccl-id-prterun-host-123_1",
        "multi-node id file defaults to $HOME: " + par::id_file_path(e));
  clear_env();

  ::setenv("SLURM_PROCID", "6", 1);
  ::setenv("SLURM_STEP_NUM_TASKS", "8", 1);
  ::setenv("SLURM_LOCALID", "2", 1);
  ::setenv("SLURM_NODEID", "1", 1);
  ::setenv("SLURM_STEP_TASKS_PER_NODE", "4(x2)", 1);
  ::setenv("SLURM_JOB_ID", "991", 1);
  ::setenv("SLURM_STEP_ID", "0", 1);
  e = par::detect_env();
  check(e.launcher == par::Launcher::slurm && e.rank == 6 && e.world_size == 8 && e.local_rank == 2 &&
            e.local_world_size == 4 && e.job_key == "991.0",
        "Slurm: " + e.describe());
  check(par::detail::slurm_tasks_on_node("2(x3),1", 3) == 1 && par::detail::slurm_tasks_on_node("2(x3),1", 2) == 2,
        "Slurm tasks-per-node lists");
  ::unsetenv("SLURM_STEP_NUM_TASKS");  // a batch script, not an srun step: one process
  check(par::detect_env().launcher == par::Launcher::single, "Slurm batch script without srun is a single process");
  clear_env();

  ::setenv("RANK", "1", 1);
  ::setenv("WORLD_SIZE", "2", 1);
  ::setenv("LOCAL_RANK", "1", 1);
  check(error_of([] { par::id_file_path(par::detect_env()); }).find("DISTILX_NCCL_ID_FILE") != std::string::npos,
        "no job key and no id file: a clear error");
  clear_env();
}

void test_rendezvous(const fs::path& dir) {
  const std::string path = (dir / "id").string();
  std::thread writer([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    par::publish_rendezvous(path, std::string("\x01\x02\n\x03", 4), 2);
  });
  const std::string got = par::await_rendezvous(path, 4, 1, 2, 10);
  writer.join();
  check(got == std::string("\x01\x02\n\x03", 4), "rendezvous: a reader waits for the writer and gets the bytes");
  check(error_of([&] { par::await_rendezvous(path, 4, 1, 3, 1); }).find("stale") != std::string::npos,
        "rendezvous: a file for another world size is refused");
  const auto t0 = std::chrono::steady_clock::now();
  const std::string msg = error_of([&] { par::await_rendezvous((dir / "never").string(), 4, 1, 2, 0.5); });
  const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  check(msg.find("rank 1 of 2") != std::string::npos && dt < 5, "rendezvous: timeout names the rank");
}

// Child behaviours for launch_local, chosen by argv[1] and the rank.
int child_main(const std::string& mode) {
  const int rank = std::atoi(std::getenv("RANK"));
  if (mode == "--child-ok") {
    const bool env_ok = std::getenv("WORLD_SIZE") && std::getenv("LOCAL_RANK") && std::getenv("DISTILX_NCCL_ID_FILE") &&
                        std::atoi(std::getenv("LOCAL_RANK")) == rank;
    return env_ok ? 0 : 9;
  }
  if (mode == "--child-fail") {  // rank 1 fails; the others would run for a minute
    if (rank == 1) {
      std::this_thread::sleep_for(std::chrono::milliseconds(300));
      return 7;
    }
    std::this_thread::sleep_for(std::chrono::seconds(60));
    return 0;
  }
  if (mode == "--child-stubborn") {  // ignores SIGTERM: the launcher must SIGKILL it
    if (rank == 0) {
      std::this_thread::sleep_for(std::chrono::milliseconds(500));
      return 5;
    }
    ::signal(SIGTERM, SIG_IGN);
    std::this_thread::sleep_for(std::chrono::seconds(60));
    return 0;
  }
  return 99;
}

void test_launch(int argc, char** argv) {
  std::vector<char*> args = {argv[0], const_cast<char*>("--child-ok")};
  check(par::launch_local(3, 2, args.data()) == 0, "launch_local: 3 ranks with their environment, all exit 0");
  args[1] = const_cast<char*>("--child-fail");
  auto t0 = std::chrono::steady_clock::now();
  int rc = par::launch_local(3, 2, args.data());
  double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  check(rc == 7 && dt < 20, "launch_local: a failing rank's code is returned and the others are stopped (" +
                                std::to_string(dt) + " s)");
  ::setenv("DISTILX_LAUNCH_GRACE", "1", 1);
  args[1] = const_cast<char*>("--child-stubborn");
  t0 = std::chrono::steady_clock::now();
  rc = par::launch_local(2, 2, args.data());
  dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  check(rc == 5 && dt < 20, "launch_local: a rank ignoring SIGTERM is killed after the grace period");
  ::unsetenv("DISTILX_LAUNCH_GRACE");
  (void)argc;
}

// A state taken on 2 ranks x 2 rows resumes on 1 rank x 4 rows (and back) with the same windows.
void test_loader_resharding(const fs::path& dir) {
  using distilx::data::LoaderOptions;
  using distilx::data::TokenLoader;
  std::vector<std::int32_t> tokens(33 * 200);
  for (std::size_t i = 0; i < tokens.size(); ++i) tokens[i] = static_cast<std::int32_t>((i * 7919) % 101);
  const std::string shard = (dir / "shard.bin").string();
  distilx::data::write_shard(shard, tokens);
  auto opts = [](int W, int r, distilx::index_t B) {
    LoaderOptions o;
    o.seq_len = 32;
    o.batch_size = B;
    o.world_size = W;
    o.rank = r;
    o.seed = 3;
    o.val_windows = 8;
    return o;
  };
  TokenLoader r0({shard}, opts(2, 0, 2)), r1({shard}, opts(2, 1, 2));
  std::vector<std::int32_t> in(2 * 32), tg(2 * 32);
  for (int k = 0; k < 5; ++k) {
    r0.next(in.data(), tg.data());
    r1.next(in.data(), tg.data());
  }
  TokenLoader resumed({shard}, opts(1, 0, 4));
  resumed.set_state(r0.state());
  TokenLoader ref({shard}, opts(1, 0, 4));
  std::vector<std::int32_t> a(4 * 32), b(4 * 32);
  for (int k = 0; k < 5; ++k) ref.next(a.data(), b.data());
  bool same = true;
  for (int k = 0; k < 3; ++k) {
    std::vector<distilx::index_t> wa, wb;
    for (int j = 0; j < 4; ++j) wa.push_back(resumed.train_window(resumed.position(), j));
    for (int j = 0; j < 4; ++j) wb.push_back(ref.train_window(ref.position(), j));
    same = same && wa == wb;
    resumed.next(a.data(), b.data());
    ref.next(a.data(), b.data());
  }
  check(same && resumed.position() == ref.position(), "loader: a 2-rank state resumes on 1 rank (same global batch)");
  // The 2-rank windows of a step are the 1-rank windows of that step.
  TokenLoader q0({shard}, opts(2, 0, 2)), q1({shard}, opts(2, 1, 2)), q({shard}, opts(1, 0, 4));
  std::vector<distilx::index_t> u, v;
  for (int j = 0; j < 2; ++j) u.push_back(q0.train_window(3, j)), u.push_back(q1.train_window(3, j));
  for (int j = 0; j < 4; ++j) v.push_back(q.train_window(3, j));
  std::sort(u.begin(), u.end());
  std::sort(v.begin(), v.end());
  check(u == v, "loader: a global batch holds the same windows on 2 ranks as on 1");
  TokenLoader odd({shard}, opts(1, 0, 3));
  check(error_of([&] { odd.set_state(r0.state()); }).find("partial global batch") != std::string::npos,
        "loader: a state that ends inside a global batch of the new geometry is refused");
}
}  // namespace

int main(int argc, char** argv) {
  if (argc > 1 && std::strncmp(argv[1], "--child", 7) == 0) return child_main(argv[1]);
  const fs::path dir = fs::temp_directory_path() / ("distilx_parallel_env_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  test_detect();
  test_rendezvous(dir);
  test_launch(argc, argv);
  test_loader_resharding(dir);
  fs::remove_all(dir);
  std::printf("%s (%d failed)\n", failures ? "FAILED" : "PASSED", failures);
  return failures ? 1 : 0;
}
