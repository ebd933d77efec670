() => {
    // A trace runs: "Tracing…" over its plot (CSS .lb-busy in ui/app.py) until the new figure is drawn
    // (below) or the event ends (`on` false).
    window.lensbenchBusy = (id, on) => {
        const block = document.getElementById(id);
        if (block) block.classList.toggle("lb-busy", on);
    };

    // A number typed outside a slider's range is brought within by Gradio without a word: say so,
    // under the slider, until an in-range value is typed.
    document.addEventListener("change", (event) => {
        const input = event.target;
        if (!(input instanceof HTMLInputElement) || input.type !== "number" || input.min === "" || input.max === "") {
            return;
        }
        const value = parseFloat(input.value), min = parseFloat(input.min), max = parseFloat(input.max);
        const block = input.closest(".block") || input.parentElement;
        let note = block.querySelector(".range-note");
        if (isNaN(value) || (value >= min && value <= max)) {
            if (note) note.remove();
            return;
        }
        if (!note) {
            note = document.createElement("div");
            note.className = "range-note";
            block.appendChild(note);
        }
        note.textContent = `${input.value} is outside ${min}–${max}: using ${value < min ? min : max}.`;
    }, true);

    // A click on a cell of the Lens heatmap picks it: "row,column,time" goes to Python through the
    // hidden #lens-cell box (Gradio's Plot has no click event of its own).
    const attach = () => {
        const graph = document.querySelector("#lens-heatmap .js-plotly-plot");
        if (!graph || graph.__lensbenchClicks || typeof graph.on !== "function") return;
        graph.__lensbenchClicks = true;
        graph.on("plotly_click", (data) => {
            const point = data.points && data.points[0];
            const box = document.querySelector("#lens-cell textarea, #lens-cell input");
            if (!point || !box) return;
            box.value = `${point.y},${point.x},${Date.now()}`;
            box.dispatchEvent(new Event("input", {bubbles: true}));
        });
    };
    // Gradio's plot draws each new figure twice: in the plot component it is about to replace, then
    // in the new one (each draw of the heatmap takes 100-300 ms without a GPU). Draw once, when the
    // page's update is done, only the newest figure of each plot still on the page. (A microtask: a
    // timer let the next message from the server, and its table, go first: 60 ms later on average.)
    const drawOnce = () => {
        const plotly = window.Plotly;
        if (!plotly || plotly.__lensbenchOnce) return;
        plotly.__lensbenchOnce = true;
        const react = plotly.react, resize = plotly.Plots.resize;
        let waiting = new Map();  // graph -> its newest arguments
        plotly.react = function (graph) {
            graph.__lensbenchWaiting = true;
            if (waiting.size === 0) {
                queueMicrotask(() => {
                    const calls = waiting;
                    waiting = new Map();
                    for (const [g, args] of calls) {
                        g.__lensbenchWaiting = false;
                        if (!g.isConnected) continue;
                        const start = Date.now();
                        react.apply(plotly, args);
                        // Gradio then has plotly fit the figure to its box (Plots.resize), which draws it
                        // all again 100 ms later even when the box has not changed (each plot, each
                        // update): only when the figure drawn and its box differ in width. Checked once
                        // the page has been laid out again (measuring now would force that layout: 25 ms).
                        setTimeout(() => {
                            const drawn = g._fullLayout && g._fullLayout.width;
                            if (g.isConnected && (!drawn || Math.abs(g.getBoundingClientRect().width - drawn) >= 1)) {
                                resize.call(plotly.Plots, g).catch(() => {});
                            }
                        }, 100);
                        // each drawing: the plot, when, how long (bench/bench_demo.py and the tests read it)
                        const host = g.closest("[id]");
                        (window.lensbenchDraws = window.lensbenchDraws || []).push(
                            [host ? host.id : "", start, Date.now() - start]);
                        if (host) host.classList.remove("lb-busy");  // the new result is there
                    }
                });
            }
            waiting.set(graph, arguments);
            return Promise.resolve(graph);
        };
        plotly.Plots.resize = function (graph) {
            return graph && graph.__lensbenchWaiting ? Promise.resolve() : resize.apply(this, arguments);
        };
    };
    new MutationObserver(() => { drawOnce(); attach(); }).observe(document.body, {childList: true, subtree: true});
}
