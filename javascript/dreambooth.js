// Every page of the web UI, whether or not it ever opens the DreamBooth tab: one long poll of
// ./dreambooth/internal/checkpoints waits on the server (up to 25 s a request, no traffic in between) until a
// training saves a checkpoint; then the page clicks the button the server names (the web UI's or Forge's 🔄 of
// the txt2img checkpoint dropdown), so the new file is listed within a second on every open page.
(function () {
    if (window.dreamboothCheckpointWatch) return;
    var URL = "./dreambooth/internal/checkpoints";
    var seen = null;
    var failures = 0;
    var stopped = false;
    function findButton(id) {
        var app = document.querySelector("gradio-app");
        var root = (app && app.shadowRoot) || document;
        return root.querySelector("#" + id) || document.getElementById(id);
    }
    function next() {
        if (stopped) return;
        fetch(URL + (seen === null ? "" : "?after=" + seen), {credentials: "same-origin", cache: "no-store"})
            .then(function (r) { return r.ok ? r.json() : Promise.reject(new Error("HTTP " + r.status)); })
            .then(function (answer) {
                failures = 0;
                if (seen !== null && answer.saved !== seen) {
                    window.dreamboothCheckpointWatch.saves += 1;
                    var button = answer.refresh ? findButton(answer.refresh) : null;
                    if (button) {
                        button.click();
                        window.dreamboothCheckpointWatch.refreshes += 1;
                    }
                }
                seen = answer.saved;
                setTimeout(next, 50);
            })
            .catch(function () {  // the web UI restarting, or no route: back off, give up after ~10 minutes
                failures += 1;
                if (failures > 20) { stopped = true; return; }
                setTimeout(next, Math.min(30000, 500 * Math.pow(2, failures)));
            });
    }
    window.dreamboothCheckpointWatch = {saves: 0, refreshes: 0, active: function () { return !stopped; }};
    if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", next);
    else next();
})();

// DreamBooth tab: while a run is active, ask the server for its progress once a second by clicking the
// tab's hidden poll button (every 5 s while the tab is hidden, e.g. while the user is on txt2img). The loop
// stops when the run is idle, when the page goes, and while a hidden tab has no run; it starts again on Train,
// on page load and when the tab is shown again.
(function () {
    if (window.dreamboothTab) return;
    var POLL_MS = 1000;
    var HIDDEN_EVERY = 5;  // while the tab is hidden, poll on every 5th tick
    var IDLE_TICKS = 3;  // polls answered "idle" before the loop stops (covers the start of a run)
    var timer = null;
    var idleTicks = 0;
    var waiting = false;
    var ticks = 0;

    function root() {
        var app = document.querySelector("gradio-app");
        return (app && app.shadowRoot) || document;
    }
    function find(id) { return root().querySelector("#" + id) || document.getElementById(id); }
    function runState() {
        var box = find("dreambooth_run_state");
        var input = box && box.querySelector("textarea, input");
        return input ? input.value : "";
    }
    function tabShown() {
        var panel = find("dreambooth_progress");
        return !document.hidden && panel !== null && panel.offsetParent !== null;
    }
    function stop() {
        if (timer !== null) clearInterval(timer);
        timer = null;
    }
    function resumeWhenShown() {
        if (waiting) return;
        waiting = true;
        var resume = function () {
            waiting = false;
            document.removeEventListener("visibilitychange", resume);
            document.removeEventListener("click", resume, true);
            setTimeout(start, 200);  // let the clicked tab become visible first
        };
        document.addEventListener("visibilitychange", resume);
        document.addEventListener("click", resume, true);
    }
    function tick() {
        var poll = find("dreambooth_poll");
        if (!poll) { stop(); return; }
        var running = runState() === "running";
        if (!tabShown()) {
            if (!running) { stop(); resumeWhenShown(); return; }
            if (++ticks % HIDDEN_EVERY !== 0) return;
        }
        if (running) idleTicks = 0;
        else if (++idleTicks > IDLE_TICKS) { stop(); return; }
        poll.click();
    }
    function start() {
        idleTicks = 0;
        if (timer === null) timer = setInterval(tick, POLL_MS);
    }
    function hook() {
        var train = find("dreambooth_train");
        if (!train) return false;
        train.addEventListener("click", function () { setTimeout(start, 300); });
        setTimeout(start, 500);  // after a page load: shows a run that is already going
        return true;
    }
    window.dreamboothTab = {start: start, stop: stop, active: function () { return timer !== null; }};
    if (!hook()) {
        var observer = new MutationObserver(function () { if (hook()) observer.disconnect(); });
        observer.observe(document.documentElement, {childList: true, subtree: true});
    }
})();
