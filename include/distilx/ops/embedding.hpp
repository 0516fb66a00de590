// Embedding lookup (frozen table, no gradient). Token ids are validated.
#pragma once

#include <cstring>

#include "distilx/backend/tags.hpp"
#include "distilx/core/error.hpp"

namespace distilx::ops {

/// y[M, d] = E[tokens[m], :]. Throws distilx::error for ids outside [0, V).
template <class T, class Tok>
void embedding_forward(cpu, T* y, const Tok* tokens, const T* E, index_t M, index_t d, index_t V) {
  for (index_t m = 0; m < M; ++m) {
    const auto id = static_cast<index_t>(tokens[m]);
    DISTILX_REQUIRE(error, id >= 0 && id < V, "token id ", id, " at position ", m,
                    " is outside the vocabulary [0, ", V, "); check the tokenizer matches the model");
    std::memcpy(y + m * d, E + id * d, sizeof(T) * d);
  }
}

}  // namespace distilx::ops
