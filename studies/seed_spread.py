"""How the pages write a number measured over seeds: 'mean ± std' (mean_std) and every seed's value (each)."""
import statistics


def mean_std(values, digits=3):
    """'m ± s' over seeds (sample standard deviation), with `digits` decimals."""
    values = [v for v in values if v is not None]
    if len(values) < 2:
        return f"{values[0]:.{digits}f}" if values else "–"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def each(values, digits=3):
    """Every seed's value, ' / '-separated."""
    return " / ".join(f"{v:.{digits}f}" for v in values)
