// Run GGUF files in llama.cpp (through node-llama-cpp's prebuilt CPU binaries) and report, per file:
// greedy completions, perplexity on given token windows, and prompt / generation tokens per second.
//
//   node benchmarks/llama_cpp_eval.mjs job.json out.json
//
// job.json: {"models": [path, ...], "windows": [[id, ...], ...], "prompts": [text, ...],
//            "max_tokens": 16, "speed": {"prompt_tokens": [id, ...], "new_tokens": 64, "rounds": 3},
//            "threads": 2}
// Perplexity: each window is scored on its own from an empty context, no BOS added (as rcpu's
// transformers evaluation does); p(next token) comes from controlledEvaluate with the full
// distribution (topK 0, topP 1, minP 0, temperature 1), so nothing is truncated. With
// "token_logprobs": true in the job, each result also lists log p(next token) per window position.
// Speed: models are timed in alternating order within each round, all in this one process, one
// model loaded at a time.
// NODE_PATH or a node_modules next to this script must provide node-llama-cpp (3.22.1 tested).
import fs from "node:fs";
import {createRequire} from "node:module";
import path from "node:path";

const require = createRequire(path.join(process.env.RCPU_NODE_MODULES || process.cwd(), "noop.js"));
const entry = require.resolve("node-llama-cpp");
const {getLlama, LlamaCompletion} = await import(entry);
const pkgVersion = JSON.parse(fs.readFileSync(path.join(path.dirname(entry), "..", "package.json"), "utf8")).version;

const [jobPath, outPath] = process.argv.slice(2);
const job = JSON.parse(fs.readFileSync(jobPath, "utf8"));
const threads = job.threads ?? 2;
// llama.cpp's own log lines (model load, perf timings) are kept and written to the output.
const logs = [];
const llama = await getLlama({
    gpu: false, build: "never", logLevel: "info",
    logger: (level, message) => logs.push(`[${level}] ${message}`.trimEnd()),
});
const full = {probabilities: true, options: {topK: 0, topP: 1, minP: 0, temperature: 1}};

async function open(modelPath, contextSize) {
    let model;
    try {
        model = await llama.loadModel({modelPath});
    } catch (err) {
        await new Promise((resolve) => setTimeout(resolve, 300));  // let the last log lines arrive
        console.error(logs.slice(-40).join("\n"));
        throw new Error(`llama.cpp could not load ${modelPath}: ${err.message}`);
    }
    const context = await model.createContext({contextSize, batchSize: contextSize, threads, sequences: 1, performanceTracking: true});
    return {model, context, sequence: context.getSequence()};
}

async function perplexity(sequence, windows, keepLogprobs) {
    let nll = 0;
    let count = 0;
    const logprobs = [];
    for (const window of windows) {
        await sequence.clearHistory();
        const input = window.map((t, i) => (i < window.length - 1 ? [t, {generateNext: full}] : t));
        const out = await sequence.controlledEvaluate(input);
        const row = [];
        for (let i = 0; i < window.length - 1; i++) {
            const p = out[i]?.next?.probabilities?.get(window[i + 1]) ?? 0;
            const lp = Math.log(Math.max(p, 1e-30));
            nll -= lp;
            count += 1;
            row.push(lp);
        }
        logprobs.push(row);
    }
    return {ppl: Math.exp(nll / count), tokens: count, ...(keepLogprobs ? {logprobs} : {})};
}

async function timeOnce(sequence, prompt, newTokens) {
    await sequence.clearHistory();
    const t0 = process.hrtime.bigint();
    await sequence.evaluateWithoutGeneratingNewTokens(prompt.slice(0, -1));
    const t1 = process.hrtime.bigint();
    let n = 0;
    let tFirst = null;
    for await (const token of sequence.evaluate(prompt.slice(-1), {temperature: 0})) {
        void token;
        n += 1;
        if (n === 1) tFirst = process.hrtime.bigint();
        if (n >= newTokens) break;
    }
    const t2 = process.hrtime.bigint();
    return {
        prompt_tps: (prompt.length - 1) / (Number(t1 - t0) / 1e9),
        gen_tps: (n - 1) / (Number(t2 - tFirst) / 1e9),  // decode steps after the first generated token
    };
}

const results = {};
const seqlen = Math.max(...(job.windows ?? [[0, 0]]).map((w) => w.length), 256);
const speed = job.speed;
const ctxSize = Math.max(seqlen, speed ? speed.prompt_tokens.length + speed.new_tokens + 8 : 0, 512);
const evaluate = (job.windows?.length ?? 0) + (job.prompts?.length ?? 0) > 0;
for (const modelPath of evaluate ? job.models : []) {
    const t0 = Date.now();
    const {model, context, sequence} = await open(modelPath, ctxSize);
    const res = {file: modelPath, bytes: fs.statSync(modelPath).size, completions: []};
    const completion = new LlamaCompletion({contextSequence: sequence});
    for (const prompt of job.prompts ?? []) {
        await sequence.clearHistory();
        const text = await completion.generateCompletion(prompt, {maxTokens: job.max_tokens ?? 16, temperature: 0});
        res.completions.push({prompt, text});
    }
    if (job.windows?.length) Object.assign(res, await perplexity(sequence, job.windows, job.token_logprobs));
    res.load_and_eval_s = (Date.now() - t0) / 1000;
    results[modelPath] = res;
    await context.dispose();
    await model.dispose();
}

if (speed) {
    // One model in memory at a time: every open context keeps its own llama.cpp thread pool, and
    // idle pools spinning next to the timed one would distort the figures.
    const runs = Object.fromEntries(job.models.map((m) => [m, []]));
    for (let r = 0; r < (speed.rounds ?? 3); r++) {
        const order = r % 2 ? [...job.models].reverse() : job.models;
        for (const m of order) {
            const {model, context, sequence} = await open(m, ctxSize);
            await timeOnce(sequence, speed.prompt_tokens, 4);  // warm-up
            runs[m].push(await timeOnce(sequence, speed.prompt_tokens, speed.new_tokens));
            if (r === (speed.rounds ?? 3) - 1) {
                logs.push(`[rcpu] timings of ${path.basename(m)} (last speed round, warm-up included):`);
                await context.printTimings();
            }
            await context.dispose();
            await model.dispose();
        }
    }
    const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
    for (const m of job.models) {
        results[m] = results[m] ?? {file: m, bytes: fs.statSync(m).size, completions: []};
        results[m].speed = {
            prompt_tps: median(runs[m].map((x) => x.prompt_tps)),
            gen_tps: median(runs[m].map((x) => x.gen_tps)),
            rounds: runs[m],
        };
    }
}

const out = {
    runtime: "llama.cpp via node-llama-cpp",
    node_llama_cpp: pkgVersion,
    llama_cpp_release: llama.llamaCppRelease?.release ?? null,
    threads,
    results: job.models.map((m) => results[m]),
    llama_cpp_log: logs,
};
fs.writeFileSync(outPath, JSON.stringify(out, null, 2));
for (const r of out.results) {
    console.log(`${path.basename(r.file)}: ${(r.bytes / 1e6).toFixed(1)} MB, ppl ${r.ppl?.toFixed(2)} ` +
        `(${r.tokens} tokens)` + (r.speed ? `, prompt ${r.speed.prompt_tps.toFixed(0)} tok/s, ` +
        `generation ${r.speed.gen_tps.toFixed(1)} tok/s` : ""));
    for (const c of r.completions) console.log(`  ${JSON.stringify(c.prompt)} -> ${JSON.stringify(c.text)}`);
}
