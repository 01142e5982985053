// CPU runner for a whole GMBINet launch sequence under host emulation (see gmbi_emu.h): the
// kernels of edgekit/kernels/cuda/gmbinet_layers.cu (which includes gmbi_fused.cu), executed launch by launch
// exactly as edgekit.kernels.graph.plan_gmbinet planned them for the GPU.
//
//   gmbinet_emu PLAN PARAMS ACTS_IN ACTS_OUT
//
// PLAN (text, written by edgekit.kernels.cuda.gmbinet._plan_text):
//   params K          then K lines "offset nbytes"   (regions of the parameter arena)
//   acts M            then M lines "offset nbytes"   (regions of the activation arena)
//   launches L        then L lines "kernel fmt gx gy gz bx by bz smem arg..."
//                     arg = p<param offset> | a<act offset> | i<int> | f<fp32 bits as uint32>
// PARAMS / ACTS_IN: the two arenas' initial bytes (activations arrive poisoned with 0xFF = NaN).
// ACTS_OUT: the activation arena after the last launch.
//
// Every region is a separate heap allocation of its exact size, so AddressSanitizer reports an
// access past any buffer even though the GPU runtime packs them into one arena.  A pointer argument
// must point at the start of a region.
#include "gmbi_emu.h"
#include "../gmbinet_layers.cu"

#include <fstream>
#include <functional>
#include <iostream>
#include <map>
#include <sstream>
#include <string>

namespace {

using Args = std::vector<uint64_t>;

template <typename T>
T* P(const Args& a, int i) { return reinterpret_cast<T*>(static_cast<uintptr_t>(a[i])); }
int I(const Args& a, int i) { return static_cast<int>(static_cast<int64_t>(a[i])); }
float F(const Args& a, int i) {
    const uint32_t u = static_cast<uint32_t>(a[i]);
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}

struct Entry {
    std::string fmt;
    std::function<void(const Args&)> fn;
};

#define DWPW_ENTRY(NAME, T)                                                                                   \
    {#NAME,                                                                                                   \
     {"PPPPPPPiiiiiiiiffiiiii", [](const Args& a) {                                                           \
          NAME(P<const T>(a, 0), P<const T>(a, 1), P<T>(a, 2), P<const float>(a, 3), P<const float>(a, 4),   \
               P<const float>(a, 5), P<const float>(a, 6), I(a, 7), I(a, 8), I(a, 9), I(a, 10), I(a, 11),     \
               I(a, 12), I(a, 13), I(a, 14), F(a, 15), F(a, 16), I(a, 17), I(a, 18), I(a, 19), I(a, 20),      \
               I(a, 21));                                                                                     \
      }}}

#define GMBI_ENTRY(NAME, T)                                                                                   \
    {#NAME,                                                                                                   \
     {"PPPPPPiiiiiiiii", [](const Args& a) {                                                                  \
          NAME(P<const T>(a, 0), P<T>(a, 1), P<const float>(a, 2), P<const float>(a, 3), P<const float>(a, 4), \
               P<const float>(a, 5), I(a, 6), I(a, 7), I(a, 8), I(a, 9), I(a, 10), I(a, 11), I(a, 12),        \
               I(a, 13), I(a, 14));                                                                           \
      }}}

#define STEM_ENTRY(NAME, T)                                                                                   \
    {#NAME,                                                                                                   \
     {"PPPPiiiiii", [](const Args& a) {                                                                       \
          NAME(P<const float>(a, 0), P<T>(a, 1), P<const float>(a, 2), P<const float>(a, 3), I(a, 4),        \
               I(a, 5), I(a, 6), I(a, 7), I(a, 8), I(a, 9));                                                  \
      }}}

#define HEAD_ENTRY(NAME, T)                                                                                   \
    {#NAME,                                                                                                   \
     {"PPPPiiiiiiff", [](const Args& a) {                                                                     \
          NAME(P<const T>(a, 0), P<float>(a, 1), P<const float>(a, 2), P<const float>(a, 3), I(a, 4),         \
               I(a, 5), I(a, 6), I(a, 7), I(a, 8), I(a, 9), F(a, 10), F(a, 11));                              \
      }}}

const std::map<std::string, Entry>& entries() {
    static const std::map<std::string, Entry> table = {
        GMBI_ENTRY(gmbi_fused_f32, float),          GMBI_ENTRY(gmbi_fused_f16, __half),
        DWPW_ENTRY(gmbinet_pw_f32, float),          DWPW_ENTRY(gmbinet_pw_f16, __half),
        DWPW_ENTRY(gmbinet_dwpw_s2_f32, float),     DWPW_ENTRY(gmbinet_dwpw_s2_f16, __half),
        DWPW_ENTRY(gmbinet_dwpw_up_f32, float),     DWPW_ENTRY(gmbinet_dwpw_up_f16, __half),
        STEM_ENTRY(gmbinet_stem_f32, float),        STEM_ENTRY(gmbinet_stem_f16, __half),
        HEAD_ENTRY(gmbinet_head_f32, float),        HEAD_ENTRY(gmbinet_head_f16, __half),
    };
    return table;
}

struct Region {
    uint64_t offset = 0, nbytes = 0;
    unsigned char* ptr = nullptr;
};

[[noreturn]] void die(const std::string& msg) {
    std::cerr << "gmbinet_emu: " << msg << "\n";
    std::exit(2);
}

std::vector<Region> read_regions(std::istream& in, const char* label, const std::vector<unsigned char>& init) {
    std::string word;
    size_t count = 0;
    if (!(in >> word >> count) || word != label) die(std::string("bad plan: expected '") + label + "'");
    std::vector<Region> regions(count);
    for (auto& r : regions) {
        if (!(in >> r.offset >> r.nbytes)) die("bad plan: truncated region list");
        if (r.offset + r.nbytes > init.size()) die("bad plan: region outside its arena");
        void* p = nullptr;
        if (posix_memalign(&p, 64, std::max<uint64_t>(r.nbytes, 1)) != 0) die("out of memory");
        r.ptr = static_cast<unsigned char*>(p);
        std::memcpy(r.ptr, init.data() + r.offset, r.nbytes);
    }
    return regions;
}

uint64_t resolve(const std::vector<Region>& regions, uint64_t offset, const char* arena) {
    for (const auto& r : regions)
        if (r.offset == offset) return reinterpret_cast<uintptr_t>(r.ptr);
    die(std::string("pointer argument at offset ") + std::to_string(offset) + " is not the start of a " + arena +
        " region");
}

std::vector<unsigned char> read_file(const char* path) {
    std::ifstream f(path, std::ios::binary);
    if (!f) die(std::string("cannot read ") + path);
    return std::vector<unsigned char>((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

}  // namespace

int main(int argc, char** argv) {
    if (argc != 5) {
        std::cerr << "usage: gmbinet_emu PLAN PARAMS ACTS_IN ACTS_OUT\n";
        return 2;
    }
    std::ifstream plan(argv[1]);
    if (!plan) die("cannot read the plan");
    const std::vector<unsigned char> params_init = read_file(argv[2]);
    const std::vector<unsigned char> acts_init = read_file(argv[3]);
    std::vector<Region> params = read_regions(plan, "params", params_init);
    std::vector<Region> acts = read_regions(plan, "acts", acts_init);
    std::string word;
    size_t nlaunch = 0;
    if (!(plan >> word >> nlaunch) || word != "launches") die("bad plan: expected 'launches'");
    std::string line;
    std::getline(plan, line);
    for (size_t li = 0; li < nlaunch; ++li) {
        if (!std::getline(plan, line)) die("bad plan: truncated launch list");
        std::istringstream ls(line);
        std::string kernel, fmt;
        emu::Dim3 grid, block;
        size_t smem = 0;
        if (!(ls >> kernel >> fmt >> grid.x >> grid.y >> grid.z >> block.x >> block.y >> block.z >> smem))
            die("bad launch line: " + line);
        auto it = entries().find(kernel);
        if (it == entries().end()) die("unknown kernel " + kernel);
        if (it->second.fmt != fmt) die(kernel + ": the plan's argument format " + fmt + " is not the kernel's " + it->second.fmt);
        if (block.x != GMBI_THREADS || block.y != 1 || block.z != 1) die(kernel + ": block must be (256, 1, 1)");
        Args args;
        std::string tok;
        while (ls >> tok) {
            const char kind = tok[0];
            const std::string v = tok.substr(1);
            const size_t i = args.size();
            if (i >= fmt.size()) die(kernel + ": too many arguments");
            const char want = fmt[i];
            if (kind == 'p' || kind == 'a') {
                if (want != 'P') die(kernel + ": argument " + std::to_string(i) + " must not be a pointer");
                args.push_back(resolve(kind == 'p' ? params : acts, std::stoull(v), kind == 'p' ? "parameter" : "activation"));
            } else if (kind == 'i') {
                if (want != 'i') die(kernel + ": argument " + std::to_string(i) + " must be an int");
                args.push_back(static_cast<uint64_t>(std::stoll(v)));
            } else if (kind == 'f') {
                if (want != 'f') die(kernel + ": argument " + std::to_string(i) + " must be a float");
                args.push_back(std::stoull(v));
            } else {
                die("bad argument token " + tok);
            }
        }
        if (args.size() != fmt.size()) die(kernel + ": wrong number of arguments");
        const auto& fn = it->second.fn;
        emu::launch(grid, block.x, smem, [&] { fn(args); });
    }
    std::vector<unsigned char> out(acts_init.size(), 0xFF);
    for (const auto& r : acts) std::memcpy(out.data() + r.offset, r.ptr, r.nbytes);
    std::ofstream o(argv[4], std::ios::binary);
    o.write(reinterpret_cast<const char*>(out.data()), static_cast<std::streamsize>(out.size()));
    for (auto& r : params) std::free(r.ptr);
    for (auto& r : acts) std::free(r.ptr);
    return o ? 0 : 2;
}
