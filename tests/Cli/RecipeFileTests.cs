using DistDiffusion.Model.Checkpoints;
using DistDiffusion.Model.Configuration;

namespace DistDiffusion.Tests.Cli;

/// <summary>`--recipe FILE.json` and `coordinator recipes`: a recipe written as JSON, checked as --set is.</summary>
[Collection(CliCollection.Name)]
public sealed class RecipeFileTests() : TempFolderTest("dd-recipe-file")
{
    private string Write(string name, string json)
    {
        var path = Path.Combine(Dir, name);
        File.WriteAllText(path, json);
        return path;
    }

    [Fact]
    public void EveryBuiltInRecipePrintedByShowIsReadBackAsTheSameRecipe()
    {
        foreach (var builtIn in Recipes.All)
        {
            var (code, output, err) = CliHarness.Run("recipes", "--show", builtIn.Name);
            Assert.True(code == 0, err);
            var file = Write(builtIn.Name + ".json", output);
            var read = Recipes.Get(file);
            Assert.Equal(builtIn.ToJson(), read.ToJson());
            Assert.Equal(builtIn, read);
        }
    }

    [Fact]
    public void RecipesListsEveryBuiltInOnALineOfItsOwn()
    {
        var (code, output, err) = CliHarness.Run("recipes");
        Assert.True(code == 0, err);
        var lines = output.Trim().Split('\n');
        Assert.Equal(Recipes.All.Count, lines.Length);
        Assert.All(Recipes.All.Zip(lines), x => Assert.StartsWith(x.First.Name + " ", x.Second, StringComparison.Ordinal));
        Assert.Contains("swissroll ", lines[0], StringComparison.Ordinal);
        Assert.Contains("T=200", lines[0], StringComparison.Ordinal);
        Assert.Equal(2, CliHarness.Run("recipes", "--show", "nope").Code);
    }

    [Fact]
    public void FieldsLeftOutKeepTheDefaultsAndEitherSpellingOfANameIsAccepted()
    {
        var file = Write("tiny.json", """{ "name": "tiny", "hidden-size": 32, "Timesteps": 20, "channel_multipliers": [1, 2], "data-path": null, "beta-end": "0.05" }""");
        var r = Recipes.Get(file);
        Assert.Equal(new Recipe() with { Name = "tiny", HiddenSize = 32, Timesteps = 20, ChannelMultipliers = [1, 2], BetaEnd = 0.05 }, r);
    }

    [Theory]
    [InlineData("""{ "learning-rate": "fast" }""", "learning-rate", "fast")]
    [InlineData("""{ "timesteps": 2.5 }""", "timesteps", "2.5")]
    [InlineData("""{ "variance": "wide" }""", "variance", "wide")]
    [InlineData("""{ "random-flip": "maybe" }""", "random-flip", "maybe")]
    [InlineData("""{ "channel-multipliers": "1,x" }""", "channel-multipliers", "1,x")]
    public void ABadValueGetsTheMessageOfSet(string json, string field, string value)
    {
        var file = Write("bad.json", json);
        var set = Assert.Throws<ArgumentException>(() => new Recipe().WithOverrides([$"{field}={value}"])).Message;
        var e = Assert.Throws<ArgumentException>(() => Recipes.Get(file));
        Assert.Equal($"recipe file {file}: {set}", e.Message);
    }

    [Theory]
    [InlineData("""{ "timesteps": 0 }""", "timesteps", "timesteps=0")]
    [InlineData("""{ "loss": "kl" }""", "variance", "loss=kl")]
    [InlineData("""{ "base-channels": 30, "group-norm-groups": 8 }""", "group-norm-groups", "base-channels=30")]
    public void TheWholeRecipeIsValidatedAsSetValidatesIt(string json, string field, string assignment)
    {
        var file = Write("invalid.json", json);
        var set = Assert.Throws<ArgumentException>(() => new Recipe().WithOverrides([assignment])).Message;
        var e = Assert.Throws<ArgumentException>(() => Recipes.Get(file));
        Assert.Equal($"recipe file {file}: {set}", e.Message);
        Assert.Contains($"'{field}'", e.Message, StringComparison.Ordinal);
    }

    [Theory]
    [InlineData("""{ "bogus": 1 }""", "unknown recipe field 'bogus'; expected one of: name, dataset,")]
    [InlineData("""{ "hidden-size": [1, 2] }""", "recipe field 'hidden-size': cannot use an array [1, 2]: expected an integer")]
    [InlineData("""{ "channel-multipliers": {"a": 1} }""", "recipe field 'channel-multipliers': cannot use an object {\"a\": 1}: expected a comma-separated list of integers")]
    [InlineData("""{ "steps": null }""", "recipe field 'steps': cannot use null: expected an integer")]
    [InlineData("""{ "hidden-size": 8, "HiddenSize": 9 }""", "recipe field 'HiddenSize' is given twice (also as 'hidden-size')")]
    [InlineData("""[1, 2]""", "expected a JSON object of recipe fields, found an array")]
    public void UnknownFieldsWrongKindsAndRepeatsAreErrors(string json, string expected)
    {
        var file = Write("odd.json", json);
        var e = Assert.Throws<ArgumentException>(() => Recipes.Get(file));
        Assert.StartsWith($"recipe file {file}: {expected}", e.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void ACorruptFileIsNamedWithTheLineAndColumnWhereReadingStopped()
    {
        var file = Write("corrupt.json", "{\n  \"timesteps\": 10,\n  oops\n}\n");
        var e = Assert.Throws<ArgumentException>(() => Recipes.Get(file));
        Assert.StartsWith($"recipe file {file}: not valid JSON at line 3, column 3: ", e.Message, StringComparison.Ordinal);
        var missing = Path.Combine(Dir, "missing.json");
        Assert.StartsWith($"recipe file {missing}: no such file", Assert.Throws<ArgumentException>(() => Recipes.Get(missing)).Message, StringComparison.Ordinal);
        // Through a verb: one line, exit code 2.
        var (code, _, err) = CliHarness.Run("train", "--recipe", file, "--out", Path.Combine(Dir, "never"));
        Assert.Equal(2, code);
        Assert.Equal($"error: {e.Message}", err.Trim());
    }

    [Fact]
    public void TrainTakesARecipeFileAndResumesWithItOnlyWhileItStatesTheRunsRecipe()
    {
        var json = """{ "name": "tiny", "hidden-size": 16, "hidden-layers": 2, "timesteps": 10, "batch-size": 32, "synthetic-size": 256, "sample-every": 0, "checkpoint-every": 0 }""";
        var file = Write("tiny.json", json);
        var run = Path.Combine(Dir, "run");
        var (code, output, err) = CliHarness.Run("train", "--recipe", file, "--out", run, "--steps", "3", "--seed", "4", "--threads", "1");
        Assert.True(code == 0, err);
        Assert.Contains("trained tiny to step 3", output, StringComparison.Ordinal);
        Assert.Equal(Recipes.Get(file) with { Steps = 3, Seed = 4 }, CheckpointStore.Load(run).Recipe);
        // The same arguments again (a restart): the file states the run's recipe, so the run continues.
        (code, output, err) = CliHarness.Run("train", "--resume", run, "--recipe", file, "--steps", "5", "--seed", "4", "--threads", "1");
        Assert.True(code == 0, err);
        Assert.Contains("to step 5", output, StringComparison.Ordinal);
        // A file that would change the recipe is refused, naming the field.
        File.WriteAllText(file, json.Replace("\"hidden-size\": 16", "\"hidden-size\": 24", StringComparison.Ordinal));
        (code, _, err) = CliHarness.Run("train", "--resume", run, "--recipe", file, "--steps", "6", "--seed", "4");
        Assert.Equal(2, code);
        Assert.Contains("would change hidden-size from 16 to 24", err, StringComparison.Ordinal);
    }
}
