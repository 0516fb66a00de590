// Student set-up from the teacher (spec-distillation.md §4): width and
// vocabulary from the teacher; blocks same / half / explicit; heads = the
// teacher's attention heads rounded up to a multiple of 4 and divided by 4, or
// explicit; the embedding and LM head copied from the teacher and frozen.
#pragma once

#include <type_traits>
#include <vector>

#include <algorithm>
#include <cstring>
#include <string>

#include "distilx/models/student.hpp"
#include "distilx/teacher/llama.hpp"

namespace distilx {

struct StudentFromTeacher {
  std::string blocks = "explicit";  // "same" (= L_t), "half" (= L_t / 2) or "explicit" (use num_blocks)
  index_t num_blocks = 6;
  std::string heads = "explicit";    // "teacher" (ceil(H_t / 4) * 4 / 4) or "explicit" (use num_heads)
  index_t num_heads = 16;
  std::string pattern = "alternate_slstm_first";  // sLSTM at 0, 2, 4, ... (the paper) or "alternate_mlstm_first"
  StudentConfig base = StudentConfig::paper();    // everything else (block sizes, FFN, chunk size)
};

/// Builds the student configuration for a teacher with the given sizes.
inline StudentConfig student_config_for_teacher(index_t vocab_size, index_t hidden_size, index_t teacher_layers,
                                                index_t teacher_heads, const StudentFromTeacher& rule) {
  StudentConfig c = rule.base;
  c.vocab_size = vocab_size;
  c.embedding_dim = hidden_size;
  if (rule.blocks == "same") c.num_blocks = teacher_layers;
  else if (rule.blocks == "half") c.num_blocks = std::max<index_t>(1, teacher_layers / 2);
  else if (rule.blocks == "explicit") c.num_blocks = rule.num_blocks;
  else throw config_error("student blocks rule '" + rule.blocks + "' is unknown (expected same, half or explicit)");
  index_t heads = rule.num_heads;
  if (rule.heads == "teacher") heads = ((teacher_heads + 3) / 4 * 4) / 4;
  else if (rule.heads != "explicit")
    throw config_error("student heads rule '" + rule.heads + "' is unknown (expected teacher or explicit)");
  c.mlstm_num_heads = c.slstm_num_heads = heads;
  c.slstm_at.clear();
  const index_t first = rule.pattern == "alternate_mlstm_first" ? 1 : 0;
  if (rule.pattern != "alternate_slstm_first" && rule.pattern != "alternate_mlstm_first" && rule.pattern != "mlstm_only")
    throw config_error("student block pattern '" + rule.pattern +
                       "' is unknown (expected alternate_slstm_first, alternate_mlstm_first or mlstm_only)");
  if (rule.pattern != "mlstm_only")
    for (index_t i = first; i < c.num_blocks; i += 2) c.slstm_at.push_back(i);
  c.validate();
  return c;
}

/// Copies the teacher's embedding and LM head into the student's frozen tensors.
template <class T, class Backend, class Teacher>
void copy_frozen_from_teacher(Student<T, Backend>& s, const Teacher& t) {
  const StudentConfig& c = s.config();
  DISTILX_REQUIRE(config_error, c.vocab_size == t.vocab_size() && c.embedding_dim == t.hidden_size(),
                  "student (V ", c.vocab_size, ", d ", c.embedding_dim, ") does not match the teacher (V ",
                  t.vocab_size(), ", d ", t.hidden_size(), ")");
  if constexpr (std::is_same_v<typename Teacher::backend_type, cpu>) {
    s.set_embedding(t.embedding().data());
    if (!c.tie_weights) s.set_head(t.lm_head().data());
  } else {  // a device teacher: stage through the host (once, at set-up)
    std::vector<T> host(static_cast<std::size_t>(t.embedding().size()));
    download(t.embedding().buffer(), 0, host.data(), t.embedding().size());
    s.set_embedding(host.data());
    if (!c.tie_weights) {
      download(t.lm_head().buffer(), 0, host.data(), t.lm_head().size());
      s.set_head(host.data());
    }
  }
}

}  // namespace distilx
