// llama.cpp's own speed for one stream, measured as its llama-bench measures it (test_prompt and
// test_gen in tools/llama-bench/llama-bench.cpp: n_batch-sized prompt decodes, one token per
// generation decode), linked against the very llama.cpp build flow uses. The crate vendors
// llama.cpp without its tools, so bench/local_engine.py compiles this against it. The prompt is the
// text bench/local_llm.rs gives flow, not llama-bench's random tokens: llama.cpp itself decodes
// that text about 5% slower than random tokens here, so both engines must read the same tokens.
// Usage: llama_bench GGUF BACKENDS_DIR N_PROMPT N_GEN RUNS  (prints one JSON line per run)
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "ggml-backend.h"
#include "llama.h"

static double now() {
    return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

int main(int argc, char ** argv) {
    if (argc < 6) {
        fprintf(stderr, "usage: %s GGUF BACKENDS_DIR N_PROMPT N_GEN RUNS\n", argv[0]);
        return 2;
    }
    const int n_prompt = atoi(argv[3]), n_gen = atoi(argv[4]), runs = atoi(argv[5]), n_batch = 512;
    llama_log_set([](ggml_log_level, const char *, void *) {}, nullptr);
    ggml_backend_load_all_from_path(argv[2]);
    llama_backend_init();
    llama_model_params mp = llama_model_default_params();
    llama_model * model = llama_model_load_from_file(argv[1], mp);
    if (!model) { fprintf(stderr, "could not load %s\n", argv[1]); return 1; }
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = n_prompt + n_gen + 16;
    cp.n_batch = n_batch;
    cp.n_ubatch = n_batch;
    const char * threads = getenv("THREADS");
    cp.n_threads = cp.n_threads_batch = threads ? atoi(threads) : 2;
    llama_context * ctx = llama_init_from_model(model, cp);
    const llama_vocab * vocab = llama_model_get_vocab(model);
    const int n_vocab = llama_vocab_n_tokens(vocab);
    printf("{\"llama_cpp_system_info\": \"%s\"}\n", llama_print_system_info());
    std::vector<llama_token> tokens(n_batch);
    for (int run = -1; run < runs; run++) {  // run -1 warms up, as llama-bench does
        llama_memory_clear(llama_get_memory(ctx), true);
        double t = now();
        for (int done = 0; done < n_prompt;) {
            int n = n_prompt - done < n_batch ? n_prompt - done : n_batch;
            tokens[0] = done == 0 && llama_vocab_get_add_bos(vocab) ? llama_vocab_bos(vocab) : std::rand() % n_vocab;
            for (int i = 1; i < n; i++) tokens[i] = std::rand() % n_vocab;
            // bench/local_llm.rs's prompt: the chat template's head, then the same words.
            std::string text = "<|im_start|>user\nRun " + std::to_string(run + 2) + ". ";
            const char * words[] = {"revenue", "margin", "segment", "cloud", "growth", "quarter", "debt",
                                    "cash", "flow", "customers", "pricing", "region", "cost"};
            for (int i = 0; i < done + n; i++) text += std::string(words[i % 13]) + " ";
            std::vector<llama_token> ids(text.size() + 16);
            int m = llama_tokenize(vocab, text.c_str(), (int) text.size(), ids.data(), (int) ids.size(), false, true);
            for (int i = 0; i < n && done + i < m; i++) tokens[i] = ids[done + i];
            if (llama_decode(ctx, llama_batch_get_one(tokens.data(), n))) { fprintf(stderr, "decode failed\n"); return 1; }
            done += n;
        }
        llama_synchronize(ctx);
        double pp = now() - t;
        llama_token tok = llama_vocab_get_add_bos(vocab) ? llama_vocab_bos(vocab) : std::rand() % n_vocab;
        t = now();
        for (int i = 0; i < n_gen; i++) {
            if (llama_decode(ctx, llama_batch_get_one(&tok, 1))) { fprintf(stderr, "decode failed\n"); return 1; }
            llama_synchronize(ctx);
            tok = std::rand() % n_vocab;
        }
        double tg = now() - t;
        if (run >= 0)
            printf("{\"run\": %d, \"prompt_tok_per_s\": %.2f, \"gen_tok_per_s\": %.2f}\n", run, n_prompt / pp, n_gen / tg);
    }
    llama_free(ctx);
    llama_model_free(model);
    return 0;
}
