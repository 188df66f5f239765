using System.CommandLine;
using DistDiffusion.Model.Configuration;

namespace DistDiffusion.Coordinator.Cli;

/// <summary>
/// `coordinator recipes`: the built-in recipes, one line each; `--show NAME` prints one in full as JSON, which saved to a
/// file is a recipe file for `--recipe FILE.json` (edit it, or give only the fields that differ from the defaults).
/// `--show FILE.json` reads a recipe file, checks it as --recipe would, and prints it in full.
/// </summary>
internal static class RecipesCommand
{
    public static Command Create()
    {
        var show = new Option<string?>("--show") { Description = "Print this recipe (a built-in name or a recipe file NAME.json) in full as JSON, the form --recipe FILE.json reads" };
        var cmd = new Command("recipes", "List the built-in recipes, or print one as JSON (a starting point for --recipe FILE.json)") { show };
        cmd.SetAction(p =>
        {
            if (p.GetValue(show) is { } name)
            {
                Console.WriteLine(CliSupport.UserInput(() => Recipes.Get(name)).ToJson());
                return CliSupport.ExitOk;
            }
            foreach (var r in Recipes.All) Console.WriteLine(Recipes.Line(r));
            return CliSupport.ExitOk;
        });
        return cmd;
    }
}
