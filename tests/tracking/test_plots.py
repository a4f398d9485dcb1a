"""The figures logged to MLflow, read from their axes: the learning curve's train/val loss and val top-1/top-5 per
epoch (the train loss alone for a refit), the sweep's trial curves with ASHA's stop marked, and the scatter."""

from types import SimpleNamespace

from matplotlib.backends.backend_agg import FigureCanvasAgg

from pipeline import metrics as m
from pipeline.tracking.plots import learning_curve, parameter_scatter, sweep_learning_curves

HISTORY = [
    {m.EPOCH: 1, m.TRAIN_LOSS: 2.0, m.VAL_LOSS: 1.8, m.VAL_TOP1: 30.0, m.VAL_TOP5: 70.0},
    {m.EPOCH: 2, m.TRAIN_LOSS: 1.4, m.VAL_LOSS: 1.5, m.VAL_TOP1: 45.0, m.VAL_TOP5: 85.0},
    {m.EPOCH: 3, m.TRAIN_LOSS: 1.1, m.VAL_LOSS: 1.6, m.VAL_TOP1: 44.0, m.VAL_TOP5: 86.0},
]


def _lines(axes) -> dict[str, tuple[list, list]]:
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in axes.get_lines()}


def test_the_learning_curve_draws_train_and_val_loss_and_val_accuracy_per_epoch():
    figure = learning_curve(HISTORY)
    loss_axes, top1_axes = figure.get_axes()
    assert _lines(loss_axes) == {"train loss": ([1, 2, 3], [2.0, 1.4, 1.1]), "val loss": ([1, 2, 3], [1.8, 1.5, 1.6])}
    assert _lines(top1_axes) == {
        "val top-1": ([1, 2, 3], [30.0, 45.0, 44.0]),
        "val top-5": ([1, 2, 3], [70.0, 85.0, 86.0]),
    }
    assert (loss_axes.get_xlabel(), loss_axes.get_ylabel()) == ("epoch", "cross-entropy")
    assert (top1_axes.get_xlabel(), top1_axes.get_ylabel()) == ("epoch", "accuracy, %")
    FigureCanvasAgg(figure).draw()  # renders without a display, as mlflow.log_figure does
    assert all(tick == int(tick) for tick in loss_axes.get_xticks())  # whole epochs only


def test_a_refits_learning_curve_is_its_train_loss_alone():
    refit = [{m.EPOCH: row[m.EPOCH], m.TRAIN_LOSS: row[m.TRAIN_LOSS]} for row in HISTORY]
    (axes,) = learning_curve(refit).get_axes()
    assert _lines(axes) == {"train loss": ([1, 2, 3], [2.0, 1.4, 1.1])}


def _trial(trial_id, top1, stop_decided_at=None, params=None):
    history = [{m.EPOCH: epoch, m.VAL_TOP1: value} for epoch, value in enumerate(top1, start=1)]
    status = f"stopped by ASHA at epoch {stop_decided_at}" if stop_decided_at else "completed"
    return SimpleNamespace(
        trial_id=trial_id,
        history=history,
        status_text=status,
        stop_decided_at=stop_decided_at,
        params=params or {},
        best_top1=max(top1, default=None),
    )


def test_the_sweep_curves_draw_each_trial_and_mark_where_asha_decided_to_stop():
    trials = [_trial("t0", [40.0, 55.0, 60.0]), _trial("t1", [25.0, 26.0], stop_decided_at=1), _trial("t2", [])]
    (axes,) = sweep_learning_curves(trials).get_axes()
    lines = axes.get_lines()
    assert [line.get_label() for line in lines if not line.get_label().startswith("_")] == [
        "t0 (completed)",
        "t1 (stopped by ASHA at epoch 1)",
    ]  # a trial without epochs draws nothing
    stop_marks = [line for line in lines if line.get_marker() == "X"]
    assert len(stop_marks) == 1 and (list(stop_marks[0].get_xdata()), list(stop_marks[0].get_ydata())) == ([1], [25.0])
    assert stop_marks[0].get_color() == lines[1].get_color()


def test_the_parameter_scatter_puts_each_searched_key_against_the_best_val_top1_with_rates_on_a_log_scale():
    trials = [
        _trial("t0", [55.0], params={"optim.lr": 0.4, "model.dropout": 0.1}),
        _trial("t1", [30.0], params={"optim.lr": 0.001, "model.dropout": 0.3}),
        _trial("t2", [], params={"optim.lr": 0.1, "model.dropout": 0.2}),  # no result: not a point
    ]
    lr_axes, dropout_axes = parameter_scatter(trials, ["optim.lr", "model.dropout"]).get_axes()
    assert (lr_axes.get_xlabel(), lr_axes.get_xscale(), dropout_axes.get_xscale()) == ("optim.lr", "log", "linear")
    points = dropout_axes.collections[0].get_offsets().tolist()
    assert points == [[0.1, 55.0], [0.3, 30.0]]
