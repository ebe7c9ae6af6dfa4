// DreamBooth tab: while a run is active, ask the server for its progress once a second by clicking the
// tab's hidden poll button. The loop stops when the run is idle, when the tab is hidden (another tab or a
// background browser tab) and when the page goes; it starts again on Train, on page load and when the tab
// is shown again.
(function () {
    if (window.dreamboothTab) return;
    var POLL_MS = 1000;
    var IDLE_TICKS = 3;  // polls answered "idle" before the loop stops (covers the start of a run)
    var timer = null;
    var idleTicks = 0;
    var waiting = false;

    function root() {
        var app = document.querySelector("gradio-app");
        return (app && app.shadowRoot) || document;
    }
    function find(id) { return root().querySelector("#" + id); }
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
        if (!tabShown()) { stop(); resumeWhenShown(); return; }
        if (runState() === "running") idleTicks = 0;
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
