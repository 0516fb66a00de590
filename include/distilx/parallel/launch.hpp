// Single-node launcher (no CUDA, no MPI): `distilx distill --gpus N` re-executes the running
// program N times, one process per GPU, with the torchrun-style variables RANK, WORLD_SIZE,
// LOCAL_RANK, LOCAL_WORLD_SIZE and a fresh DISTILX_NCCL_ID_FILE for the NCCL id rendezvous; each
// child selects GPU LOCAL_RANK when it creates its communicator (nccl.cuh).
//
//   int main(int argc, char** argv) {
//     if (gpus > 1 && !distilx::parallel::is_launched_worker())
//       return distilx::parallel::launch_local(gpus, argc, argv);
//     auto comm = distilx::parallel::Communicator::from_environment();  // in each child
//     ...
//   }
//
// The launcher forwards SIGINT / SIGTERM / SIGHUP to the children (which run in their own process
// group, so a Ctrl-C reaches each of them exactly once), and when one child fails it stops the
// others (SIGTERM, then SIGKILL after DISTILX_LAUNCH_GRACE seconds, default 10) and returns a
// non-zero code after printing which rank failed and how. Children die with the launcher
// (PR_SET_PDEATHSIG). Multi-node runs use mpirun or srun instead (docs/distributed.md).
#pragma once

#include <signal.h>
#include <sys/prctl.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "distilx/core/error.hpp"

extern char** environ;

namespace distilx::parallel {

/// True in a process started by launch_local (it sets DISTILX_LAUNCHED=1).
inline bool is_launched_worker() {
  const char* v = std::getenv("DISTILX_LAUNCHED");
  return v && std::strcmp(v, "1") == 0;
}

namespace detail {
inline volatile sig_atomic_t& launch_signal() {
  static volatile sig_atomic_t s = 0;
  return s;
}
extern "C" inline void launch_on_signal(int sig) { launch_signal() = sig; }

inline std::string describe_status(int status) {
  if (WIFEXITED(status)) return ::distilx::detail::concat("exited with code ", WEXITSTATUS(status));
  if (WIFSIGNALED(status)) {
    const int s = WTERMSIG(status);
    return ::distilx::detail::concat("was killed by signal ", s, " (", strsignal(s), ")");
  }
  return "stopped";
}
inline int exit_code_of(int status) {
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
  return 1;
}
}  // namespace detail

/// Runs `gpus` copies of this program (argv unchanged) as ranks 0..gpus-1 of one job and waits
/// for them. Returns 0 when every rank exits with 0; otherwise the failing rank's exit code
/// (128 + signal for a signal), after a message on stderr naming the rank. Call it only in the
/// parent (see is_launched_worker()).
inline int launch_local(int gpus, int argc, char** argv) {
  using ::distilx::detail::concat;
  DISTILX_REQUIRE(config_error, gpus >= 1, "--gpus must be at least 1, got ", gpus);
  DISTILX_REQUIRE(config_error, argc >= 1 && argv && argv[0], "launch_local: argv is empty");
  DISTILX_REQUIRE(config_error, !is_launched_worker(), "launch_local called inside a launched worker (rank ",
                  std::getenv("RANK") ? std::getenv("RANK") : "?", "): check is_launched_worker() first");
  double grace_s = 10;
  if (const char* g = std::getenv("DISTILX_LAUNCH_GRACE")) grace_s = std::max(0.0, std::atof(g));

  // The program itself, whatever directory it was started from.
  std::string exe(PATH_MAX, '\0');
  const ssize_t len = ::readlink("/proc/self/exe", exe.data(), exe.size() - 1);
  exe = len > 0 ? exe.substr(0, static_cast<std::size_t>(len)) : std::string(argv[0]);

  // A fresh directory for the id file, so no stale file of an earlier run is ever read.
  const char* tmpdir = std::getenv("TMPDIR");
  std::string dir_template = std::string(tmpdir && *tmpdir ? tmpdir : "/tmp") + "/distilx-launch-XXXXXX";
  DISTILX_REQUIRE(io_error, ::mkdtemp(dir_template.data()) != nullptr, "launch_local: cannot create a directory like '",
                  dir_template, "': ", std::strerror(errno));
  const std::string id_file = dir_template + "/nccl-id";
  const std::string run_id = concat("local-", ::getpid(), "-", std::chrono::steady_clock::now().time_since_epoch().count());

  // Environments and argv built before fork (the child only calls async-signal-safe functions).
  static const char* const kOverridden[] = {"RANK=", "WORLD_SIZE=", "LOCAL_RANK=", "LOCAL_WORLD_SIZE=",
                                            "DISTILX_NCCL_ID_FILE=", "DISTILX_LAUNCHED=", "DISTILX_RUN_ID="};
  std::vector<std::string> base;
  for (char** e = environ; e && *e; ++e) {
    bool skip = false;
    for (const char* k : kOverridden) skip = skip || std::strncmp(*e, k, std::strlen(k)) == 0;
    if (!skip) base.emplace_back(*e);
  }
  std::vector<std::vector<std::string>> envs(static_cast<std::size_t>(gpus), base);
  std::vector<std::vector<char*>> envps(static_cast<std::size_t>(gpus));
  for (int r = 0; r < gpus; ++r) {
    auto& e = envs[static_cast<std::size_t>(r)];
    e.push_back(concat("RANK=", r));
    e.push_back(concat("WORLD_SIZE=", gpus));
    e.push_back(concat("LOCAL_RANK=", r));
    e.push_back(concat("LOCAL_WORLD_SIZE=", gpus));
    e.push_back("DISTILX_NCCL_ID_FILE=" + id_file);
    e.push_back("DISTILX_LAUNCHED=1");
    e.push_back("DISTILX_RUN_ID=" + run_id);
    for (auto& s : e) envps[static_cast<std::size_t>(r)].push_back(s.data());
    envps[static_cast<std::size_t>(r)].push_back(nullptr);
  }
  std::vector<char*> args(argv, argv + argc);
  args.push_back(nullptr);

  // Signals: record, forward from the loop below.
  struct sigaction sa {};
  sa.sa_handler = detail::launch_on_signal;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = 0;  // no SA_RESTART: waitpid returns EINTR so the signal is forwarded at once
  struct sigaction old_int {}, old_term {}, old_hup {};
  sigaction(SIGINT, &sa, &old_int);
  sigaction(SIGTERM, &sa, &old_term);
  sigaction(SIGHUP, &sa, &old_hup);
  detail::launch_signal() = 0;

  const pid_t parent = ::getpid();
  std::vector<pid_t> pids(static_cast<std::size_t>(gpus), -1);
  std::vector<bool> done(static_cast<std::size_t>(gpus), false);
  int alive = 0;
  std::string failure;
  int result = 0;

  auto signal_all = [&](int sig) {
    for (int r = 0; r < gpus; ++r)
      if (pids[static_cast<std::size_t>(r)] > 0 && !done[static_cast<std::size_t>(r)])
        ::kill(pids[static_cast<std::size_t>(r)], sig);
  };

  std::fflush(stdout);
  std::fflush(stderr);
  for (int r = 0; r < gpus; ++r) {
    const pid_t pid = ::fork();
    if (pid < 0) {
      failure = concat("launch_local: fork for rank ", r, " failed: ", std::strerror(errno));
      result = 1;
      break;
    }
    if (pid == 0) {
      ::setpgid(0, 0);                      // terminal signals go to the launcher, which forwards them once
      ::prctl(PR_SET_PDEATHSIG, SIGTERM);   // die with the launcher
      if (::getppid() != parent) ::_exit(1);
      sigaction(SIGINT, &old_int, nullptr);
      sigaction(SIGTERM, &old_term, nullptr);
      sigaction(SIGHUP, &old_hup, nullptr);
      ::execve(exe.c_str(), args.data(), envps[static_cast<std::size_t>(r)].data());
      const char msg[] = "distilx launch: execve of the worker failed\n";
      (void)!::write(2, msg, sizeof msg - 1);
      ::_exit(127);
    }
    pids[static_cast<std::size_t>(r)] = pid;
    ++alive;
  }
  if (result != 0) signal_all(SIGTERM);

  bool stopping = result != 0;
  int forwarded = 0;
  std::chrono::steady_clock::time_point stop_t0 = std::chrono::steady_clock::now();
  bool killed = false;
  while (alive > 0) {
    if (const int sig = detail::launch_signal()) {
      detail::launch_signal() = 0;
      if (!forwarded) forwarded = sig;
      std::fprintf(stderr, "distilx launch: received signal %d (%s), forwarding it to the ranks\n", sig, strsignal(sig));
      signal_all(sig);
    }
    int status = 0;
    const pid_t pid = ::waitpid(-1, &status, stopping ? WNOHANG : 0);
    if (pid < 0) {
      if (errno == EINTR) continue;
      break;  // ECHILD: nothing left
    }
    if (pid == 0) {  // stopping: children still alive
      if (!killed && std::chrono::duration<double>(std::chrono::steady_clock::now() - stop_t0).count() > grace_s) {
        std::fprintf(stderr, "distilx launch: ranks still running %.0f s after SIGTERM; sending SIGKILL\n", grace_s);
        signal_all(SIGKILL);
        killed = true;
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
      continue;
    }
    int r = -1;
    for (int i = 0; i < gpus; ++i)
      if (pids[static_cast<std::size_t>(i)] == pid) r = i;
    if (r < 0) continue;
    done[static_cast<std::size_t>(r)] = true;
    --alive;
    const bool ok = WIFEXITED(status) && WEXITSTATUS(status) == 0;
    if (!ok && !stopping) {
      result = detail::exit_code_of(status);
      failure = concat("distilx launch: rank ", r, " of ", gpus, " (pid ", pid, ") ", detail::describe_status(status),
                       forwarded ? " after the forwarded signal" : "",
                       alive > 0 ? "; stopping the other ranks" : "");
      std::fprintf(stderr, "%s\n", failure.c_str());
      std::fflush(stderr);
      stopping = true;
      stop_t0 = std::chrono::steady_clock::now();
      signal_all(SIGTERM);
    }
  }

  sigaction(SIGINT, &old_int, nullptr);
  sigaction(SIGTERM, &old_term, nullptr);
  sigaction(SIGHUP, &old_hup, nullptr);
  ::unlink(id_file.c_str());
  ::rmdir(dir_template.c_str());
  if (result != 0 && failure.rfind("distilx launch", 0) != 0) std::fprintf(stderr, "%s\n", failure.c_str());
  if (result == 0 && forwarded) result = 128 + forwarded;
  return result;
}

}  // namespace distilx::parallel
