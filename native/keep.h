// The one keep-count rule of lazy prefill, shared by the engine's stages and Python (plz_keep_count).
#pragma once
#include <algorithm>
#include <cmath>

namespace plz {

// How many of `n_total` tokens a stage with keep ratio `keep` holds: ceil(keep * n) with the product
// rounded to 6 decimals first (so 0.7 * 10 is 7, not 8), at least 1.
inline int keep_count(float keep, int n_total) {
    const double prod = std::round((double) keep * n_total * 1e6) / 1e6;
    return std::max(1, (int) std::ceil(prod));
}

}  // namespace plz
