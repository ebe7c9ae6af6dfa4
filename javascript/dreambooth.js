// DreamBooth tab: while a run is active, ask the server for its progress once a second by clicking the
// tab's hidden poll button (every 5 s while the tab is hidden, e.g. while the user is on txt2img). Each time the
// list of saved checkpoints grows, the web UI's own checkpoint refresh button is clicked, so the new file is in
// the txt2img dropdown at once. The loop stops when the run is idle, when the page goes, and while a hidden tab
// has no run; it starts again on Train, on page load and when the tab is shown again.
(function () {
    if (window.dreamboothTab) return;
    var POLL_MS = 1000;
    var HIDDEN_EVERY = 5;  // while the tab is hidden, poll on every 5th tick
    var IDLE_TICKS = 3;  // polls answered "idle" before the loop stops (covers the start of a run)
    var timer = null;
    var idleTicks = 0;
    var waiting = false;
    var ticks = 0;
    var checkpointsSeen = -1;

    function root() {
        var app = document.querySelector("gradio-app");
        return (app && app.shadowRoot) || document;
    }
    function find(id) { return root().querySelector("#" + id) || document.getElementById(id); }
    function savedCheckpoints() {
        var list = find("dreambooth_checkpoints");
        return list ? list.querySelectorAll("input[type=radio]").length : 0;
    }
    function refreshWebUiCheckpoints() {
        var now = savedCheckpoints();
        if (checkpointsSeen >= 0 && now > checkpointsSeen) {
            var refresh = find("refresh_sd_model_checkpoint");  // the web UI's quicksettings 🔄
            if (refresh) refresh.click();
        }
        checkpointsSeen = now;
    }
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
        refreshWebUiCheckpoints();  // what the previous poll brought
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
