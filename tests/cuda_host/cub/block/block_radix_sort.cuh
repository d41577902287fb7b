// Host stand-in for CUB's BlockRadixSort (tests/cuda_host): the key-value Sort of a blocked arrangement, with
// CUB's semantics -- ascending by the key's bits in [begin_bit, end_bit), stable (equal keys keep their order in
// the blocked arrangement: thread t's item i is entry t * ITEMS_PER_THREAD + i), the result blocked again -- and
// its contract: the TempStorage is shared by the block, every thread of the block calls Sort, and a __syncthreads
// must separate Sort from any later use of the storage's memory (this stand-in does not add one at the end, as
// CUB does not). Inside: the items meet in the storage, one thread runs std::stable_sort, each reads its items back.
#pragma once

#include <algorithm>
#include <numeric>
#include <type_traits>

namespace cub {

struct NullType {};

template <typename KeyT, int BLOCK_DIM_X, int ITEMS_PER_THREAD, typename ValueT = NullType, int RADIX_BITS = 4,
          bool MEMOIZE_OUTER_SCAN = true>
class BlockRadixSort {
    static_assert(std::is_unsigned<KeyT>::value, "the stand-in sorts unsigned integer keys (all atskern uses)");
    static_assert(!std::is_same<ValueT, NullType>::value, "the stand-in implements the key-value Sort only");
    static constexpr int ITEMS = BLOCK_DIM_X * ITEMS_PER_THREAD;

public:
    struct TempStorage {
        KeyT keys[ITEMS];
        ValueT values[ITEMS];
        int order[ITEMS];
    };

    explicit BlockRadixSort(TempStorage& storage) : storage_(storage) {}

    void Sort(KeyT (&keys)[ITEMS_PER_THREAD], ValueT (&values)[ITEMS_PER_THREAD], int begin_bit = 0,
              int end_bit = (int)sizeof(KeyT) * 8) {
        const int first = (int)threadIdx.x * ITEMS_PER_THREAD;
        for (int i = 0; i < ITEMS_PER_THREAD; ++i) {
            storage_.keys[first + i] = keys[i];
            storage_.values[first + i] = values[i];
        }
        __syncthreads();
        if (threadIdx.x == 0) {
            const int width = end_bit - begin_bit;
            const KeyT mask = width >= (int)sizeof(KeyT) * 8 ? ~KeyT(0) : (KeyT)((KeyT(1) << width) - 1);
            auto digits = [&](int j) { return (KeyT)((storage_.keys[j] >> begin_bit) & mask); };
            std::iota(storage_.order, storage_.order + ITEMS, 0);
            std::stable_sort(storage_.order, storage_.order + ITEMS, [&](int a, int b) { return digits(a) < digits(b); });
        }
        __syncthreads();
        for (int i = 0; i < ITEMS_PER_THREAD; ++i) {
            keys[i] = storage_.keys[storage_.order[first + i]];
            values[i] = storage_.values[storage_.order[first + i]];
        }
    }

private:
    TempStorage& storage_;
};

}  // namespace cub
