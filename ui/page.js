() => {
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
    new MutationObserver(attach).observe(document.body, {childList: true, subtree: true});
}
